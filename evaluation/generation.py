"""Greedy generation and log-likelihood scoring against any (model, tokenizer) pair.

Works with a plain transformers causal LM, a PEFT-wrapped one, or whatever
``silotune.modeling.load_model`` returns, as long as it has ``generate`` and ``__call__``.

The end of the file is FlowerTune's finance protocol (``--protocol flowertune``): its model loading
(4-bit, "[PAD]") and its generation (total length 512, the tokenizer's padding side, whole-sequence
decoding), kept apart from the fast protocols' greedy_generate so neither bends the other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silotune.errors import UserError

Progress = Callable[[int, int], None]


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _context_limit(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop_words: Sequence[str] = (),
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text, special tokens dropped).

    Prompts are left-padded into batches of similar length (sorted by token count, answers
    returned in the caller's order): on FlowerTune's finance suite this computes 228k prompt
    positions instead of 347k, a third less time for the same answers, since the attention mask
    and the positions derived from it make a row's result independent of its batch-mates. A
    prompt longer than the model's context keeps its last tokens (bigcode-harness truncates on
    the left too). Generation of a batch stops once every row has produced a stop word; text
    after the first stop word is kept here and cut by the caller, which knows the benchmark's rule.
    """
    device = _device(model)
    limit = _context_limit(model)
    pad_id = _pad_id(tokenizer)
    all_ids = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(all_ids[i]))
    by_position: dict[int, str] = {}
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        encoded = [all_ids[i] for i in rows]
        new_tokens = max_new_tokens
        if limit is not None:
            keep = max(limit - max_new_tokens, limit // 2)
            encoded = [ids[-keep:] for ids in encoded]
            new_tokens = max(1, min(max_new_tokens, limit - max(len(e) for e in encoded)))
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention.to(device),
            "max_new_tokens": new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": pad_id,
        }
        if tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = tokenizer.eos_token_id
        if stop_words:
            kwargs["stopping_criteria"] = [_StopOnWords(tokenizer, width, stop_words)]
        with torch.no_grad():
            out = model.generate(**kwargs)
        for row, position in enumerate(rows):
            by_position[position] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
        if progress:
            progress(len(by_position), len(prompts))
    return [by_position[i] for i in range(len(prompts))]


class _StopOnWords:
    """Stop a batch once every row's new text contains a stop word (bigcode-harness rule)."""

    def __init__(self, tokenizer: Any, start: int, words: Sequence[str]) -> None:
        self.tokenizer, self.start, self.words = tokenizer, start, tuple(words)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = all(any(w in t for w in self.words) for t in texts)
        # transformers >= 4.39 expects one flag per row.
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def loglik_choose(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[int]:
    """For each prompt, the index of the answer text with the highest total log-probability.

    A prompt's trailing space moves onto the answers ("Answer: " + "positive" is scored as
    "Answer:" + " positive"), so the answer's first token is the one a tokenizer actually
    produces mid-text.
    """
    device = _device(model)
    pairs: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    for i, (prompt, options) in enumerate(zip(prompts, answers, strict=True)):
        stripped = prompt.rstrip(" ")
        moved = prompt[len(stripped) :]
        ctx = tokenizer(stripped)["input_ids"]
        for option in options:
            full = tokenizer(stripped + moved + option)["input_ids"]
            # Score the tokens past the shared prefix; robust to merges at the boundary.
            shared = 0
            while shared < min(len(ctx), len(full)) and ctx[shared] == full[shared]:
                shared += 1
            shared = max(1, min(shared, len(full) - 1))
            pairs.append((full[:shared], full[shared:]))
            owners.append(i)
    scores: list[float] = []
    pad_id = _pad_id(tokenizer)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [c + a for c, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: positions stay 0..len-1
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for r, (ctx, ans) in enumerate(chunk):
            total = 0.0
            for j, tok in enumerate(ans):
                total += float(logprobs[r, len(ctx) + j - 1, tok])
            scores.append(total)
        if progress:
            progress(min(owners[min(start + batch_size, len(owners)) - 1] + 1, len(prompts)), len(prompts))
    best: dict[int, tuple[float, int]] = {}
    counters: dict[int, int] = {}
    for owner, score in zip(owners, scores, strict=True):
        k = counters.get(owner, 0)
        counters[owner] = k + 1
        if owner not in best or score > best[owner][0]:
            best[owner] = (score, k)
    return [best[i][1] for i in range(len(prompts))]


# --- FlowerTune's finance protocol (flwrlabs/flower benchmarks/flowertune-llm/evaluation/finance) ---
FLOWERTUNE_SEED = 2024
FLOWERTUNE_MAX_LENGTH = 512  # prompt + generation, in tokens
FLOWERTUNE_BATCH_SIZE = 32  # the README's command line
FLOWERTUNE_PAD = "[PAD]"


def needs_flowertune_pad(tokenizer: Any) -> bool:
    """eval.py's condition for adding "[PAD]": no pad token, or a pad that is the EOS token."""
    return not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id


def add_flowertune_pad(model: Any, tokenizer: Any) -> bool:
    """Add "[PAD]" and resize the embeddings where eval.py does; True if it did.

    Mutates both arguments: call it on the evaluation's own copies. The new embedding row is drawn
    by transformers from the old rows' mean and covariance, i.e. from torch's RNG, which is why
    FlowerTune's seed is set before loading.
    """
    if not needs_flowertune_pad(tokenizer):
        return False
    tokenizer.add_special_tokens({"pad_token": FLOWERTUNE_PAD})
    model.resize_token_embeddings(len(tokenizer))
    return True


def sampling_settings(model: Any) -> dict[str, Any]:
    """The sampling switches of the model's own generation_config (empty when it decodes greedily).

    FlowerTune passes no ``do_sample``, so a model whose generation_config.json asks for sampling
    (many chat models do) is sampled, under seed 2024, on the leaderboard too.
    """
    cfg = getattr(model, "generation_config", None)
    if cfg is None or not getattr(cfg, "do_sample", False):
        return {}
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def flowertune_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = FLOWERTUNE_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[str]:
    """The WHOLE decoded sequence (prompt included, special tokens dropped) for every prompt.

    Call for call as FlowerTune's ``inference``: the tokenizer's own padding side (right for
    GPT-2-style tokenizers, so shorter prompts continue after their "[PAD]"s), ``max_length=512``
    as the TOTAL length and no ``max_new_tokens``, EOS from the tokenizer, the model's own
    generation_config otherwise. ``generate`` stops a batch as soon as every row has produced EOS.
    """
    import warnings

    device = _device(model)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        with warnings.catch_warnings():
            # FlowerTune passes max_length without truncation; the tokenizer says it is ignored.
            warnings.filterwarnings("ignore", message=".*max_length.*is ignored.*")
            tokens = tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                max_length=FLOWERTUNE_MAX_LENGTH,
                return_token_type_ids=False,
            )
        tokens = {k: v.to(device) for k, v in tokens.items()}
        with torch.no_grad():
            out = model.generate(
                **tokens, max_length=FLOWERTUNE_MAX_LENGTH, eos_token_id=tokenizer.eos_token_id
            )
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in out]
        if progress:
            progress(len(outputs), len(prompts))
    return outputs


@dataclass
class FlowerTuneModel:
    """A model loaded the way FlowerTune's finance eval.py loads it, and how that went."""

    model: Any
    tokenizer: Any
    identity: str  # name@sha256-prefix of the base weights
    quantization: str  # what was USED: "4bit" or "none"
    quantization_note: str  # the kernel, or why 4-bit was not used
    added_pad: bool  # "[PAD]" added and the embeddings resized


def _model_location(base: str) -> str:
    """The directory or hub id transformers loads, as silotune.modeling resolves ``base``."""
    from silotune.modeling import _gguf_cache_dir, resolve_source

    src = resolve_source(base)
    # GGUF files (embedded:...) are de-quantized once into a safetensors cache; 4-bit loads that.
    return str(_gguf_cache_dir(src)) if src.gguf_file else src.location


def _load_4bit(location: str, device: str) -> Any:
    """eval.py's ``BitsAndBytesConfig(load_in_4bit=True)`` (fp4, float32 compute), float32 rest."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from silotune.modeling import keep_4bit_layers_trainable

    model = AutoModelForCausalLM.from_pretrained(
        location,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        dtype=torch.float32,
        device_map={"": device},
    )
    # On CPU, bitsandbytes would repack each layer for its fused AVX512 kernel on first use, which
    # computes in bfloat16 (and fails on layers narrower than a block). Off, every layer de-quantizes
    # and multiplies in float32: the compute dtype FlowerTune's config asks for.
    keep_4bit_layers_trainable(model)
    with torch.no_grad():  # a missing kernel fails here, not an hour into the run
        model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    return model


def _load_unquantized(location: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).to(device)


def _bnb_version() -> str:
    from importlib.metadata import version

    return version("bitsandbytes")


def _load_weights(
    location: str, device: str, quantization: str, log: Callable[[str], None]
) -> tuple[Any, str, str]:
    """(model, quantization used, note): 4-bit when asked and possible, else float32, said loudly."""
    if quantization != "4bit":
        return _load_unquantized(location, device), "none", "unquantized float32 (--quantization none)"
    try:
        model = _load_4bit(location, device)
    except OSError:
        raise  # the model itself is missing: no fallback can help
    except Exception as exc:  # no bitsandbytes, no backend for this device, a kernel error
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        log(f"flowertune: 4-bit loading failed ({reason}); evaluating UNQUANTIZED float32 weights")
        return _load_unquantized(location, device), "none", f"4-bit unavailable ({reason}); float32"
    note = f"bitsandbytes {_bnb_version()} 4-bit fp4, float32 compute, on {device}"
    if device == "cpu":
        note += " (CPU kernel: not bit-identical to the leaderboard's CUDA runs)"
    return model, "4bit", note


def load_flowertune_model(
    base: str,
    adapter: str | None = None,
    quantization: str = "4bit",
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> FlowerTuneModel:
    """Base (+ PEFT adapter) and tokenizer as FlowerTune's finance eval.py loads them.

    Seed 2024 first; 4-bit weights unless ``quantization="none"`` or bitsandbytes cannot run here
    (then float32, said in the log and in ``quantization_note``); the adapter on top; the base's
    tokenizer loaded afresh (not ``silotune.modeling.load_tokenizer``, whose pad choice may differ),
    padding side untouched; "[PAD]" added where eval.py adds it.
    """
    from transformers import AutoTokenizer

    from silotune.modeling import model_identity, pick_device

    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: no adapter_config.json there; pass the folder a "
            "PEFT adapter was saved to (save_pretrained)"
        )
    torch.manual_seed(FLOWERTUNE_SEED)
    location, device = _model_location(base), pick_device()
    try:
        model, used, note = _load_weights(location, device, quantization, log)
    except OSError as exc:
        raise UserError(f"--base {base}: cannot load ({exc})") from None
    log(f"flowertune: weights {used}: {note}")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(location)
    added = add_flowertune_pad(model, tokenizer)
    if added:
        log(f'flowertune: no pad distinct from EOS; added "{FLOWERTUNE_PAD}" and resized the embeddings')
    model.eval()
    return FlowerTuneModel(model, tokenizer, model_identity(base).short(), used, note, added)
