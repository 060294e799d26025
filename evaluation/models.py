"""Load the base model (+ PEFT adapter) to evaluate, through ``silotune.modeling`` - the loader
training uses - so the evaluated base is exactly the one the federation trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.errors import UserError


@dataclass
class EvalModel:
    model: Any
    tokenizer: Any
    identity: str  # name@sha256-prefix, recorded in reports


def load_for_eval(
    base: str, adapter: str | None = None, dtype: str = "fp32", quantization: str = "none"
) -> EvalModel:
    """Base model by hub id, local directory or ``embedded:...``; adapter from a PEFT directory."""
    from silotune.config import ConfigError, ModelConfig
    from silotune.modeling import load_model

    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: no adapter_config.json there; pass the folder a "
            "PEFT adapter was saved to (save_pretrained)"
        )
    try:
        cfg = ModelConfig(name=base, dtype=dtype, quantization=quantization)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"--base/--dtype: {exc}") from None
    loaded = load_model(cfg, for_training=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    identity = loaded.identity.short() if hasattr(loaded.identity, "short") else str(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return EvalModel(model, tokenizer, identity)
