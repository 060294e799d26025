"""Greedy generation and log-likelihood scoring against any (model, tokenizer) pair.

Works with a plain transformers causal LM, a PEFT-wrapped one, or whatever
``silotune.modeling.load_model`` returns, as long as it has ``generate`` and ``__call__``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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

    Prompts are left-padded into batches; a prompt longer than the model's context keeps its
    last tokens (bigcode-harness truncates on the left too). Generation of a batch stops once
    every row has produced a stop word; text after the first stop word is kept here and cut by
    the caller, which knows the benchmark's rule.
    """
    device = _device(model)
    limit = _context_limit(model)
    pad_id = _pad_id(tokenizer)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        encoded = [tokenizer(p)["input_ids"] for p in batch]
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
        for row in range(len(batch)):
            outputs.append(tokenizer.decode(out[row, width:], skip_special_tokens=True))
        if progress:
            progress(len(outputs), len(prompts))
    return outputs


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
