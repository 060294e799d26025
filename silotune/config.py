"""The one typed description of a federation run, and of one silo's settings.

Flower hands run settings around as a flat ``{"peft.rank": 8, ...}`` mapping (``[tool.flwr.app.config]``
and ``--run-config``) and silo settings as ``--node-config 'data-path=... lora-rank=4'``. Both are
parsed here, into pydantic models that refuse unknown keys and bad values with an error naming the
key in the same spelling the user wrote (``peft.rank``, ``data-path``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

Domain = Literal["general", "finance", "medical", "code"]
PeftMethod = Literal["lora", "dora", "qlora", "ia3"]
# silo_node/app/templates.py renders both; "eval" is FlowerTune's finance evaluation prompt.
PromptStyle = Literal["alpaca", "eval"]
StrategyName = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "flexlora"]
# superlink/app/defences/aggregators.py: which silos' updates each module's average uses ("mean": all).
AggregatorName = Literal["mean", "trimmed-mean", "median", "multi-krum", "consensus"]
# Upper bound of every wait a run config sets: a week is longer than any sane round.
MAX_WAIT_SECONDS = 7 * 24 * 3600.0


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or out of range. The message names the key."""


def _dash(name: str) -> str:
    return name.replace("_", "-")


def sha256_hex(value: str, what: str) -> str:
    """A SHA-256 written as 64 hex digits, lower-cased ("" stays ""); ``what`` says whose, in the error."""
    if value and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"must be 64 hex digits ({what})")
    return value.lower()


class StrictSection(BaseModel):
    """The one strict base of every settings file SiloTune reads (run config, silo policy, kit):
    users write dashed keys ("lr-max"), Python uses underscores, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dash, populate_by_name=True, frozen=True)


class ModelConfig(StrictSection):
    """Base model: a hub id, a local directory, or the embedded SmolLM2 GGUF."""

    name: str = EMBEDDED_MODEL
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False
    use_chat_template: bool = True
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a hub id, a local directory or 'embedded:...'")
        return v.strip()


class PeftSettings(StrictSection):
    method: PeftMethod = "lora"
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Comma-separated in flat config; "all-linear" is PEFT's shorthand.
    target_modules: str = "q_proj,v_proj"
    # The digest (silotune.adapters.state_digest) of a published adapter to start from instead of
    # the one derived from train.seed; every silo must list it in its policy (silo_node/app/start_adapter.py).
    start_adapter: str = ""
    # Train only each LoRA pair's B and keep A as the run started it (FFA-LoRA, Sun et al., ICLR
    # 2024). Under DP-SGD every trained coordinate gets the same noise, and AdamW moves each by
    # about the learning rate whether it holds signal or noise; A's gradients are scaled by B, small
    # early in training (zero from the seeded start), so trained A is mostly noise. Frozen, the
    # noise covers fewer coordinates (docs/privacy.md measures the gain) and the silos' B factors
    # share one A, so averaging B averages the products B A exactly.
    freeze_lora_a: bool = False

    @field_validator("start_adapter")
    @classmethod
    def _digest(cls, v: str) -> str:
        return sha256_hex(v, "an adapter's digest: `silotune silo start-adapter DIR` prints it")

    @property
    def target_module_list(self) -> list[str] | str:
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        mods = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return mods

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str) -> str:
        if not [m for m in v.split(",") if m.strip()]:
            raise ValueError("must list at least one module name, e.g. 'q_proj,v_proj'")
        return v


class TrainSettings(StrictSection):
    seq_length: int = Field(256, ge=8, le=131072)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    local_steps: int = Field(5, ge=1)
    lr_max: float = Field(1e-3, gt=0)
    lr_min: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    # "alpaca": FlowerTune's training prompt; "eval": the prompt its finance evaluation asks with
    # (silo_node/app/templates.py says why one would train in it).
    prompt_style: PromptStyle = "alpaca"
    # Each silo carries its AdamW state (moments, step count) from round to round, kept in its
    # state dir and never sent (silo_node/app/optimizer_state.py). Off: a fresh AdamW every round,
    # as in FlowerTune.
    keep_optimizer_state: bool = False

    @model_validator(mode="after")
    def _lr_order(self) -> TrainSettings:
        if self.lr_min > self.lr_max:
            raise ValueError("train.lr-min must not exceed train.lr-max")
        return self


class StrategySettings(StrictSection):
    name: StrategyName = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_nodes: int = Field(2, ge=1)
    # Seconds the server waits for replies in one round; late silos are dropped for that round.
    # Finite and at most MAX_WAIT_SECONDS: `inf` (which TOML and --set accept) would wait forever.
    round_timeout: float = Field(1800.0, gt=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)
    # Seconds to wait at the start of a round for min-nodes silos to be connected.
    wait_for_nodes: float = Field(600.0, gt=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)
    # A round with no reply for this many times the expected round time (median of completed
    # rounds, else round-timeout) is failed by the watchdog (superlink/app/watchdog.py).
    watchdog_factor: float = Field(3.0, ge=1, le=100, allow_inf_nan=False)
    proximal_mu: float = Field(0.0, ge=0)
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    # --- defences against a faulty or malicious silo (docs/security.md) ---
    # Robust selection layered under any strategy (superlink/app/defences/aggregators.py). The default
    # keeps every silo whose update agrees with the others' (a plain mean on a clean run) and drops
    # one that would set the direction: with 3 or more answers no single silo steers; with 2 it
    # is a mean (nobody can tell which of two disagreeing silos is wrong), bounded by the caps.
    aggregator: AggregatorName = "consensus"
    # A silo's aggregation weight: its number of training examples (FedAvg, FlowerTune), or equal
    # for every silo (superlink/app/defences/ declared_weights).
    weighting: Literal["examples", "equal"] = "examples"
    # No silo gets more than this share of a round's aggregation weight.
    max_weight_share: float = Field(0.5, gt=0, le=1, allow_inf_nan=False)
    # Fewer valid updates than this: the round leaves the global adapter unchanged.
    min_answers: int = Field(1, ge=1)
    # Per-module bound on the Frobenius norm of a silo's effective update; 0 = off.
    clip_norm: float = Field(0.0, ge=0, allow_inf_nan=False)
    # Per-module bound as a multiple of the round's median update norm; 0 = off.
    clip_relative: float = Field(3.0, ge=0, allow_inf_nan=False)
    # Silos assumed faulty: multi-krum's f, the trimmed mean's trim count.
    max_byzantine: int = Field(1, ge=0)
    # consensus: two updates agree when their distance is within this multiple of the median norm.
    consensus_tolerance: float = Field(1.5, gt=0, allow_inf_nan=False)
    # A silo is flagged when its distance from the others (or its norm) exceeds this multiple of
    # the round's median norm; flagged in anomaly-rounds consecutive rounds: excluded (0 = never).
    anomaly_threshold: float = Field(3.0, gt=1, allow_inf_nan=False)
    # ... or when its update points against the others': cosine with the sum of the others' updates
    # below this (-1 = never). Norm and distance cannot see a sign flip: an update of the usual
    # norm is never more than 2 norms from another, under any threshold > 2.
    anomaly_min_cosine: float = Field(0.0, ge=-1, le=1, allow_inf_nan=False)
    anomaly_rounds: int = Field(3, ge=0)
    # Largest LoRA rank a silo may declare (FlexLoRA); bounds the memory a handshake can claim.
    max_rank: int = Field(64, ge=1, le=1024)

    @field_validator("clip_relative")
    @classmethod
    def _clip_relative(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("must be 0 (off) or at least 1 (below 1 it clips the median silo too)")
        return v


class TransportSettings(StrictSection):
    """How adapters travel (silotune/wire_codec.py): both ways, in one format for the whole run."""

    dtype: Literal["fp32", "bf16", "int8", "int4"] = "fp32"
    # Quantization block size for int8/int4 (bitsandbytes' sizes); 0 = the format's default
    # (int8: 256, int4: 128, which keep them under 0.26x and 0.14x of fp32 bytes).
    block_size: Literal[0, 64, 128, 256, 512, 1024, 2048, 4096] = 0
    # Silos carry their quantization residual to the next round (on disk, in their state dir).
    error_feedback: bool = True
    # fp32 packed into two arrays like the other formats (Flower moves every array as its own HTTP
    # requests: per-tensor arrays cost seconds per round); false: one array per tensor.
    pack: bool = True


class CentralDPSettings(StrictSection):
    """Central differential privacy on the aggregate (superlink/app/defences/central_dp.py).

    The central site clips every silo's whole adapter delta to ``clipping-norm`` (L2, over all
    tensors), averages the clipped deltas with equal weights and adds Gaussian noise of std
    ``noise-multiplier x clipping-norm / silos asked``. Its own accountant (Opacus RDP) counts the
    epsilon of that mechanism at ``target-delta``; with ``max-epsilon`` > 0 the run refuses the
    round that would pass it. Separate from, and composing with, a silo's own DP-SGD budget
    (docs/privacy.md).
    """

    enabled: bool = False
    # z: the noise's std in clipping norms, on the sum of the clipped deltas.
    noise_multiplier: float = Field(1.0, gt=0, allow_inf_nan=False)
    # C: bound on the L2 norm of one silo's whole adapter delta (all tensors flattened together),
    # relative to the adapter it was sent; in parameter units, so it depends on the adapter's scale.
    clipping_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    # delta of the (epsilon, delta) the accountant reports; well below 1 / (number of silos).
    target_delta: float = Field(1e-5, gt=0, lt=1, allow_inf_nan=False)
    # Stop before the round whose release would take epsilon past this; 0 = no limit (TOML and
    # Flower's run config have no null).
    # Default 8 (the epsilon the privacy benchmark's goals are set at): a run that turns central DP on
    # gets a bounded budget without remembering to set one; 0 must be asked for by name.
    max_epsilon: float = Field(8.0, ge=0, allow_inf_nan=False)


class RunConfig(StrictSection):
    num_rounds: int = Field(3, ge=1)
    domain: Domain = "finance"
    run_dir: str = "runs/default"
    resume: bool = True
    # Communication budget in megabytes (FlowerTune: 200,000 MB); 0 disables the check.
    comm_budget_mb: float = Field(200_000.0, ge=0)
    model: ModelConfig = ModelConfig()
    peft: PeftSettings = PeftSettings()
    train: TrainSettings = TrainSettings()
    strategy: StrategySettings = StrategySettings()
    transport: TransportSettings = TransportSettings()
    central_dp: CentralDPSettings = CentralDPSettings()

    @model_validator(mode="after")
    def _consistency(self) -> RunConfig:
        if self.peft.method == "qlora" and self.model.quantization != "4bit":
            # QLoRA *is* LoRA on a 4-bit base; make the pairing explicit rather than silent.
            object.__setattr__(self, "model", self.model.model_copy(update={"quantization": "4bit"}))
        if self.peft.rank > self.strategy.max_rank:
            raise ValueError(f"peft.rank={self.peft.rank} exceeds strategy.max-rank={self.strategy.max_rank}")
        if self.strategy.name == "flexlora" and self.peft.method not in ("lora", "qlora"):
            raise ValueError(
                f"strategy.name=flexlora needs peft.method lora or qlora (got {self.peft.method!r})"
            )
        if self.peft.freeze_lora_a and self.peft.method == "ia3":
            raise ValueError("peft.freeze-lora-a=true needs a LoRA method (lora, qlora, dora); ia3 has no A")
        if self.peft.freeze_lora_a and self.strategy.name == "flexlora":
            # FlexLoRA re-factors the averaged product B A by SVD, which gives every silo a new A.
            raise ValueError(
                "peft.freeze-lora-a=true cannot keep A under strategy.name=flexlora (it re-factors A)"
            )
        if self.central_dp.enabled and self.strategy.name == "flexlora":
            # FlexLoRA sends every silo factors at its own rank: the deltas share no shape, so there
            # is no one vector per silo to clip and average under one sensitivity.
            raise ValueError(
                "central-dp.enabled=true needs strategy.name fedavg, fedprox, fedavgm or fedadam "
                "(flexlora's per-silo ranks give updates of different shapes)"
            )
        return self


def lr_for_round(train: TrainSettings, server_round: int, num_rounds: int) -> float:
    """FlowerTune's cosine annealing across rounds: lr-max at round 0, lr-min at the last round."""
    cos_inner = math.pi * server_round / max(num_rounds, 1)
    return train.lr_min + 0.5 * (train.lr_max - train.lr_min) * (1 + math.cos(cos_inner))


class SiloConfig(StrictSection):
    """One silo's settings, from ``flower-supernode --node-config`` (or the launcher)."""

    data_path: str
    domain: Domain | None = None  # defaults to the run's domain
    name: str = "silo"
    lora_rank: int | None = Field(None, ge=1, le=1024)  # FlexLoRA: this silo's own rank
    # Column mapping "instruction=question,output=answer" from the file's names to the template's.
    columns: str = ""
    # Map raw labels to words, e.g. TFNS "0=negative,1=positive,2=neutral".
    label_map: str = ""
    data_encoding: str = "utf-8"
    max_examples: int = Field(0, ge=0)  # 0 = all
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    state_dir: str = ""  # where the silo writes its metric events ("" = none)
    # The silo operator's policy file (silo_node/app/policy.py); "" = $SILOTUNE_SILO_POLICY or the defaults.
    policy_file: str = ""

    def column_mapping(self) -> dict[str, str]:
        return _parse_pairs(self.columns, "columns")

    def label_mapping(self) -> dict[str, str]:
        return _parse_pairs(self.label_map, "label-map")


def _parse_pairs(text: str, key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise ConfigError(f"{key}: expected 'a=b,c=d', got {part!r}")
        a, b = part.split("=", 1)
        out[a.strip()] = b.strip()
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        cur = nested
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: '{p}' is a value, not a section")
            cur = nxt
        cur[parts[-1]] = value
    return nested


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; keys use dashes, e.g. 'lr-max')"
        lines.append(
            f"  {key}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
                else ""
            )
        )
    return f"invalid {source}:\n" + "\n".join(lines)


def parse_run_config(flat: Mapping[str, Any], source: str = "run config") -> RunConfig:
    """Build a RunConfig from Flower's flat run config (dotted, dashed keys)."""
    try:
        return RunConfig.model_validate(_nest(flat))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def parse_silo_config(flat: Mapping[str, Any], source: str = "node config") -> SiloConfig:
    """Build a SiloConfig from a SuperNode's node config (Flower adds its own keys; we drop them)."""
    ours = {k: v for k, v in flat.items() if k not in _FLOWER_NODE_KEYS}
    if "data-path" not in ours and "data_path" not in ours:
        raise ConfigError(
            f"invalid {source}:\n  data-path: missing; start the silo with "
            "--node-config 'data-path=/path/to/private.jsonl'"
        )
    try:
        return SiloConfig.model_validate(ours)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


# Keys Flower itself puts into node_config (simulation / deployment); not ours to validate.
_FLOWER_NODE_KEYS = {"partition-id", "num-partitions"}


def flatten_run_config(cfg: RunConfig) -> dict[str, Any]:
    """The inverse of parse_run_config: a flat dict suitable for --run-config and manifests."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(f"{prefix}{_dash(name)}.", getattr(obj, name))
        else:
            out[prefix[:-1]] = obj

    walk("", cfg)
    return out


def read_toml_run_values(path: Path) -> dict[str, Any]:
    """The flat run-config keys a TOML file sets (flat dotted keys or nested tables), checked."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read run config {path}: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = obj

    walk("", data)
    parse_run_config(flat, source=str(path))  # a bad key or value fails here, naming the file
    return flat


def load_toml_run_config(path: Path) -> RunConfig:
    """Read a run config from a TOML file (flat dotted keys or nested tables)."""
    return parse_run_config(read_toml_run_values(path), source=str(path))
