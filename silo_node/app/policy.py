"""Silo policy: what this silo will do for a run, decided by the silo's operator, not by the run.

The run config comes from whoever submits the run, and every silo would otherwise obey it, including
``model.trust-remote-code=true`` with any ``model.name`` (arbitrary code at the silo). So each silo
checks every message's run against its own policy file BEFORE any model is loaded, and refuses what
the policy does not allow. The reason goes to this silo's log and audit log; the central site gets
only the code POLICY_REFUSED with its fixed text (silotune/silo_failures.py).

The file (TOML, ``silotune silo start --policy FILE``; all keys optional)::

    federation-ca-sha256 = "AB:CD:..."     # the federation this silo serves (checked at start)
    allow-embedded = true                  # embedded:* models shipped inside a Python package
    allow-local-paths = false              # true: base models in any local directory of this machine
    allow-trust-remote-code = false        # never run a model's own Python code unless true
    max-rounds = 1000
    max-local-steps = 1000
    max-seq-length = 4096
    max-batch-size = 64                    # every compute knob of a run is the silo's to cap:
    max-grad-accum = 64                    #   memory (batch x seq) and time (steps x accum)
    max-rank = 64                          # LoRA rank (FlexLoRA: this silo's own rank too)
    allowed-target-modules = []            # e.g. ["q_proj", "v_proj"]; empty: any, "all-linear" too
    require-approval = false               # hold each new run until `silotune silo approve RUN_ID`
    allowed-apps = []                      # FAB hashes of other apps the resident worker may run
    approval-timeout-hours = 72            # then refuse it

    [[models]]                             # hub ids (or pinned local paths) this silo will load
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    sha256 = "..."                         # optional: the weight files' hash (silotune model id)

    [[start-adapters]]                     # adapters a run may start from (peft.start-adapter)
    sha256 = "..."                         # `silotune silo start-adapter DIR` prints it
    path = "/srv/silotune/adapters/public" # a PEFT adapter directory (silo_node/app/start_adapter.py)

    [privacy]                              # DP-SGD on this silo's records (docs/privacy.md)
    noise-multiplier = 1.0                 # or target-epsilon = 3.0 (what each run may spend)
    delta = 1e-5
    max-grad-norm = 1.0                    # per-sample clipping norm
    min-logical-batch = 0                  # e.g. 64: records per noisy step at least (0: the run's)
    epsilon-budget = 8.0                   # all runs together, on this dataset; then refuse
    accountant = "rdp"                     # or "prv" (Opacus's accountants)
    dataset-id = ""                        # the budget's key; default: the data file's path

Without a file the defaults above apply: embedded models only (no local directory unless allowed or
listed, no hub id unless listed), no remote code.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from silotune.config import RunConfig, StrictSection, _format_error, sha256_hex
from silotune.errors import ApprovalPending, PolicyRefused, UserError

POLICY_ENV = "SILOTUNE_SILO_POLICY"  # alternative to node config's policy-file
_HEX_FP = re.compile(r"^[0-9A-F]{64}$")
__all__ = ["ApprovalPending", "PolicyRefused", "SiloPolicy", "load_policy"]


class PolicyError(UserError):
    """The policy file itself is unreadable or invalid; the message names the file and the key."""


class AllowedModel(StrictSection):
    name: str
    sha256: str = ""  # empty: any weights under this name (not recommended for hub ids)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        return sha256_hex(v, "the weight files' SHA-256, or absent")


class StartAdapter(StrictSection):
    """``[[start-adapters]]``: an adapter this silo installed and lets a run start from."""

    sha256: str = Field(..., min_length=64)  # silotune.adapters.state_digest of its values and shapes
    path: str  # the PEFT adapter directory on this machine

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        return sha256_hex(v, "the adapter's digest: `silotune silo start-adapter DIR` prints it")


class PrivacyPolicy(StrictSection):
    """``[privacy]``: record-level DP at this silo. Only the silo's policy sets these; the run
    config has no key for any of them (silo_node/app/privacy.py applies them, docs/privacy.md)."""

    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # The expected records per noisy step, at least. Noise per coordinate of the averaged gradient
    # is noise-multiplier x max-grad-norm / logical batch, so DP's utility turns on this number; the
    # run's batch-size x grad-accum is raised to it (more micro-batches of the run's batch-size, so
    # memory stays as the run set it). 0: the run's own.
    min_logical_batch: int = Field(0, ge=0)
    epsilon_budget: float = Field(..., gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    dataset_id: str = ""

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyPolicy:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise-multiplier and target-epsilon")
        if self.target_epsilon is not None and self.target_epsilon > self.epsilon_budget:
            raise ValueError("target-epsilon must not exceed epsilon-budget")
        return self


class SiloPolicy(StrictSection):
    federation_ca_sha256: str = ""
    allow_embedded: bool = True
    # Off by default: a run could otherwise name any directory the silo can read as its base model.
    allow_local_paths: bool = False
    allow_trust_remote_code: bool = False
    max_rounds: int = Field(1000, ge=1)
    max_local_steps: int = Field(1000, ge=1)
    max_seq_length: int = Field(4096, ge=8)
    max_batch_size: int = Field(64, ge=1)
    max_grad_accum: int = Field(64, ge=1)
    max_rank: int = Field(64, ge=1)
    # Module names a run may adapt ("all-linear" must be listed to be allowed); empty: any.
    allowed_target_modules: tuple[str, ...] = ()
    require_approval: bool = False
    approval_timeout_hours: float = Field(72.0, gt=0)
    models: tuple[AllowedModel, ...] = ()
    # Flower FAB hashes (sha256 of the .fab) of apps other than the installed SiloTune that the
    # resident worker may run (silo_node/ops/worker.py); `silotune silo app-hash APP_DIR` prints one.
    allowed_apps: tuple[str, ...] = ()
    # Adapters a run may start from instead of the one derived from train.seed (absent: none).
    start_adapters: tuple[StartAdapter, ...] = ()
    # Differential privacy at this silo (absent: none); see PrivacyPolicy.
    privacy: PrivacyPolicy | None = None

    @field_validator("allowed_apps")
    @classmethod
    def _app_hashes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", h):
                raise ValueError(f"{h!r} is not a FAB hash (64 hex digits)")
        return tuple(h.lower() for h in v)

    @field_validator("federation_ca_sha256")
    @classmethod
    def _fingerprint(cls, v: str) -> str:
        norm = normalise_fingerprint(v)
        if v and not _HEX_FP.match(norm):
            raise ValueError("must be the CA certificate's SHA-256 (`silotune certs show ca.crt`)")
        return norm


def normalise_fingerprint(text: str) -> str:
    return text.replace(":", "").replace(" ", "").strip().upper()


def load_policy(path: str | Path | None) -> SiloPolicy:
    """The policy in ``path``; the defaults when ``path`` is empty. Errors name the file and key."""
    if not path:
        return SiloPolicy()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"cannot read the silo policy {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"invalid silo policy {p}: not valid TOML ({exc})") from None
    try:
        return SiloPolicy.model_validate(raw)
    except ValidationError as err:
        raise PolicyError(_format_error(err, f"silo policy {p}")) from None


def ca_fingerprint(ca_file: Path) -> str:
    """SHA-256 of the CA certificate (DER), 64 upper-case hex digits."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the CA certificate {ca_file}: {exc}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def check_federation(policy: SiloPolicy, ca_file: Path | None, policy_path: str | Path = "") -> None:
    """At `silo start`: refuse to serve a federation other than the one the policy names."""
    if not policy.federation_ca_sha256:
        return
    where = f" ({policy_path})" if policy_path else ""
    if ca_file is None:
        raise UserError(
            f"the silo policy{where} pins federation-ca-sha256, but the silo was started without "
            "--ca (plaintext): refusing to start"
        )
    actual = ca_fingerprint(ca_file)
    if actual != policy.federation_ca_sha256:
        raise UserError(
            f"the CA in {ca_file} (SHA-256 {actual}) is not the federation this silo's policy{where} "
            f"serves (federation-ca-sha256 {policy.federation_ca_sha256}): refusing to start"
        )


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()


def check_run(policy: SiloPolicy, run: RunConfig) -> None:
    """Raise PolicyRefused (detail for this silo's log) if the run asks for more than the policy allows.

    Only cheap checks that load nothing; the model's weight hash is checked by ``check_model_hash``."""
    name = run.model.name
    if run.model.trust_remote_code and not policy.allow_trust_remote_code:
        raise PolicyRefused(
            f"the run asks for model.trust-remote-code=true (model {name!r}); this silo's policy "
            "does not allow it (allow-trust-remote-code)"
        )
    if _allowed_entry(policy, name) is None:
        if name.startswith("embedded:"):
            if not policy.allow_embedded:
                raise PolicyRefused(
                    f"the run's base model {name!r} is embedded; the policy has allow-embedded = false"
                )
        elif _is_local_path(name):
            if not policy.allow_local_paths:
                raise PolicyRefused(
                    f"the run's base model {name!r} is a local path; the policy has allow-local-paths=false "
                    "and does not list it under [[models]]"
                )
        else:
            raise PolicyRefused(
                f"the run's base model {name!r} is not in this silo's policy ([[models]] name = ...)"
            )
    limits = (
        ("num-rounds", run.num_rounds, policy.max_rounds, "max-rounds"),
        ("train.local-steps", run.train.local_steps, policy.max_local_steps, "max-local-steps"),
        ("train.seq-length", run.train.seq_length, policy.max_seq_length, "max-seq-length"),
        ("train.batch-size", run.train.batch_size, policy.max_batch_size, "max-batch-size"),
        ("train.grad-accum", run.train.grad_accum, policy.max_grad_accum, "max-grad-accum"),
        ("peft.rank", run.peft.rank, policy.max_rank, "max-rank"),
    )
    for key, asked, limit, policy_key in limits:
        if asked > limit:
            raise PolicyRefused(
                f"the run asks for {key}={asked}; this silo's policy allows at most {policy_key}={limit}"
            )
    check_target_modules(policy, run.peft.target_modules)
    start_entry(policy, run)
    if policy.privacy is not None:
        check_private_run(run)


# PEFT methods whose trainable layers Opacus takes per-sample gradients of: LoRA's lora_A/lora_B are
# nn.Linear (QLoRA's too, over the 4-bit base). DoRA's magnitude vector and IA3's scaling vectors
# live in PEFT modules Opacus has no grad sampler for (DoRA's is called with keyword arguments its
# functorch fallback cannot pass; IA3's sits in a ParameterDict that is never called), so a DP
# round of either would fail at every step: the silo refuses the run at its handshake instead.
DP_PEFT_METHODS = ("lora", "qlora")


def check_private_run(run: RunConfig) -> None:
    """Refuse (PolicyRefused) what this silo's DP-SGD cannot train: checked when a run starts
    (``check_run``) and again before every DP round (silo_node/app/privacy.py ``round_budget``)."""
    if run.peft.method not in DP_PEFT_METHODS:
        raise PolicyRefused(
            f"this silo trains with differential privacy ([privacy]), which supports peft.method "
            f"{' or '.join(DP_PEFT_METHODS)}; the run asks for {run.peft.method!r}, whose trainable "
            "vectors Opacus takes no per-sample gradients of"
        )
    if run.model.gradient_checkpointing:
        raise PolicyRefused(
            "[privacy] needs per-sample gradients, which Opacus cannot take through gradient "
            "checkpointing (model.gradient-checkpointing=true)"
        )


def start_entry(policy: SiloPolicy, run: RunConfig) -> StartAdapter | None:
    """The policy's entry for the run's start adapter (None: the run starts from train.seed).
    Nothing is loaded here; silo_node/app/start_adapter.py loads and verifies the files."""
    digest = run.peft.start_adapter
    if not digest:
        return None
    for entry in policy.start_adapters:
        if entry.sha256 == digest:
            return entry
    raise PolicyRefused(
        f"the run starts from adapter {digest[:12]}... (peft.start-adapter); this silo's policy lists "
        "no such start adapter ([[start-adapters]] sha256 = ..., path = ...)"
    )


def check_target_modules(policy: SiloPolicy, target_modules: str) -> None:
    """Refuse adapted modules the policy does not list (``all-linear`` only when listed itself)."""
    if not policy.allowed_target_modules:
        return
    asked = [m.strip() for m in target_modules.split(",") if m.strip()]
    extra = sorted(set(asked) - set(policy.allowed_target_modules))
    if extra:
        raise PolicyRefused(
            f"the run asks for peft.target-modules={target_modules!r}; this silo's policy allows only "
            f"{', '.join(policy.allowed_target_modules)} (allowed-target-modules), not {', '.join(extra)}"
        )


def check_silo_rank(policy: SiloPolicy, rank: int) -> None:
    """A silo's own LoRA rank (FlexLoRA, node config ``lora-rank``) is a compute knob too."""
    if rank > policy.max_rank:
        raise PolicyRefused(f"this silo's LoRA rank {rank} exceeds its policy's max-rank={policy.max_rank}")


def _allowed_entry(policy: SiloPolicy, name: str) -> AllowedModel | None:
    for entry in policy.models:
        if entry.name == name:
            return entry
    return None


def check_model_hash(policy: SiloPolicy, name: str, sha256: str) -> None:
    """A listed model with a pinned hash must have exactly those weights (hash of the files, unloaded)."""
    entry = _allowed_entry(policy, name)
    if entry is not None and entry.sha256 and entry.sha256 != sha256.lower():
        raise PolicyRefused(
            f"the base model {name!r} has weights {sha256[:12]}..., the policy pins {entry.sha256[:12]}..."
        )


def pinned_hash(policy: SiloPolicy, name: str) -> str:
    entry = _allowed_entry(policy, name)
    return entry.sha256 if entry else ""
