"""Record-level differential privacy at a silo: DP-SGD with Opacus, and a budget the silo owns.

Only the silo's policy (``[privacy]`` in its policy file, silo_node/app/policy.py) turns this on and
sets its numbers: noise multiplier or target epsilon, delta, per-sample clipping norm, epsilon
budget. The run config has no key for any of them, so whoever submits a run cannot loosen them;
what a run does choose (batch size, local steps, rounds) only changes what a round costs, and the
budget check below refuses a round that costs too much.

The mechanism (docs/privacy.md says the same for a privacy officer):

* Sampling: every optimizer step draws its batch by **Poisson sampling** (Opacus's
  ``UniformWithReplacementSampler``): each training record joins independently with probability
  ``q = logical batch / n``, the logical batch being ``batch-size x grad-accum`` raised to the
  policy's ``min-logical-batch``. That is the sampled Gaussian mechanism Opacus's accountants
  assume. The draw uses a generator seeded from the OS's entropy, never from the run's seed,
  which the central site knows; so does the noise.
* Per-sample gradients and clipping: Opacus's ``GradSampleModule`` (hooks on the adapter's
  layers; the frozen base model gets none) and ``DPOptimizer`` (clip each record's gradient to
  ``max-grad-norm``, sum, add Gaussian noise of std ``noise-multiplier x max-grad-norm``, divide by
  the expected batch size). The loss is each record's mean over its response tokens, averaged over
  records, so a record's gradient never depends on the other records of its batch.
* Accounting: each round is ``(noise multiplier, q, local-steps)`` appended to a ledger per dataset
  in ``<state-dir>/privacy/`` (JSON, written atomically, mode 0600); epsilon at the policy's delta
  is Opacus's RDP (or PRV) accountant over the whole ledger, every run and round together.
* The budget: before a round trains, the silo computes the epsilon the ledger would show with the
  round added; above ``epsilon-budget`` the round is refused (:class:`PrivacyBudgetExhausted`,
  code PRIVACY_BUDGET_EXHAUSTED at the central site). The ledger is locked from that check until
  the round is recorded, so two runs on one dataset cannot both take the last of the budget. A
  round is recorded after it trained and before its adapter leaves: one that fails spends nothing;
  one recorded whose reply is then lost still counts (conservative).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silo_node.app.audit import append_audit
from silo_node.app.optimizer_state import OptimizerState
from silo_node.app.policy import PrivacyPolicy, check_private_run
from silo_node.app.training import IGNORE_INDEX, Encoded, TrainResult, collate, make_optimizer, run_steps
from silotune.atomic_files import atomic_write_json
from silotune.config import RunConfig, SiloConfig, TrainSettings
from silotune.errors import PolicyRefused, PrivacyBudgetExhausted

PRIVACY_DIR = "privacy"
LEDGER_VERSION = 1

__all__ = [
    "DPRound",
    "Ledger",
    "dataset_id",
    "epsilon_of",
    "plan_round",
    "privacy_summary",
    "round_budget",
    "train_round_dp",
]


# -- accounting ---------------------------------------------------------------------------------------
def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of a history of ``(noise multiplier, sample rate, steps)``, by Opacus."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target(policy: PrivacyPolicy, sample_rate: float, steps: int) -> float:
    """The noise multiplier with which ``steps`` steps at ``sample_rate`` spend target-epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    # The search tries noise far below the answer, where the RDP bound's best order is the largest
    # Opacus tries, and warns about it; the answer's own epsilon is recomputed (epsilon_of), so the
    # warning says nothing about the noise chosen and only alarms an operator reading the log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=float(policy.target_epsilon or 0.0),
                target_delta=policy.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=policy.accountant,
            )
        )


def dataset_id(policy: PrivacyPolicy, silo: SiloConfig) -> str:
    """What the budget belongs to: the policy's dataset-id, else the training file's real path."""
    return policy.dataset_id or str(Path(silo.data_path).expanduser().resolve())


class Ledger:
    """The rounds spent on one dataset, in ``<state-dir>/privacy/<name>-<hash>.json`` (0600)."""

    def __init__(self, state_dir: str | Path, dataset: str) -> None:
        digest = hashlib.sha256(dataset.encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset).name or "dataset")[:40]
        self.dataset = dataset
        self.path = Path(state_dir) / PRIVACY_DIR / f"{stem}-{digest}.json"

    def entries(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        if data.get("dataset") != self.dataset:
            raise PolicyRefused(f"privacy ledger {self.path} belongs to {data.get('dataset')!r}")
        return list(data.get("rounds", []))

    def history(self, run_id: str | None = None) -> list[tuple[float, float, int]]:
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries()
            if run_id is None or e["run_id"] == run_id
        ]

    def append(self, entry: dict[str, Any]) -> None:
        rounds = [*self.entries(), entry]
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(
            self.path, {"version": LEDGER_VERSION, "dataset": self.dataset, "rounds": rounds}, mode=0o600
        )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over processes (flock, released by the kernel if this process dies)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -- one round's plan and its budget check ------------------------------------------------------------
@dataclass
class DPRound:
    """What a DP round does and costs. ``commit`` records it in the ledger once it has trained."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    max_grad_norm: float
    delta: float
    budget: float
    accountant: str = "rdp"
    spent_before: float = 0.0
    spent_after: float = 0.0
    run_before: float = 0.0
    run_after: float = 0.0
    ledger: Ledger | None = None
    run_id: str = ""
    server_round: int = 0
    silo: str = ""
    state_dir: str = ""
    committed: bool = field(default=False)

    def metrics(self) -> dict[str, float]:
        """The event fields of this round (silotune.protocol.DP_FIELDS)."""
        from silotune import protocol as p

        return {
            p.DP_EPSILON_SPENT: self.spent_after,
            p.DP_EPSILON_BUDGET: self.budget,
            p.DP_EPSILON_RUN: self.run_after,
            p.DP_NOISE_MULTIPLIER: self.noise_multiplier,
            p.DP_DELTA: self.delta,
        }

    def commit(self) -> None:
        if self.ledger is None or self.committed:
            return
        self.ledger.append(
            {
                "run_id": self.run_id,
                "round": self.server_round,
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
                "max_grad_norm": self.max_grad_norm,
                "epsilon_after": self.spent_after,
                "delta": self.delta,
                "ts": time.time(),
            }
        )
        self.committed = True
        if self.state_dir:
            append_audit(
                self.state_dir,
                "privacy",
                silo=self.silo,
                run_id=self.run_id,
                round=self.server_round,
                epsilon_round=round(self.spent_after - self.spent_before, 6),
                epsilon_run=round(self.run_after, 6),
                epsilon_spent=round(self.spent_after, 6),
                epsilon_budget=self.budget,
                delta=self.delta,
                noise_multiplier=round(self.noise_multiplier, 6),
                sample_rate=self.sample_rate,
                logical_batch=self.expected_batch_size,
                steps=self.steps,
            )


def _sampling(policy: PrivacyPolicy, train: TrainSettings, n_examples: int) -> tuple[float, int]:
    """(q, expected records per noisy step): the run's batch-size x grad-accum raised to the policy's
    min-logical-batch (the silo's call: it pays the compute, and DP's utility turns on it)."""
    if n_examples <= 0:
        raise PolicyRefused("differential privacy needs at least one training record")
    logical = max(train.batch_size * train.grad_accum, policy.min_logical_batch)
    return min(1.0, logical / n_examples), min(logical, n_examples)


def plan_round(
    policy: PrivacyPolicy, run: RunConfig, n_examples: int, ledger: Ledger | None = None, run_id: str = ""
) -> DPRound:
    """The round's noise, sampling rate and steps, and the epsilon it would leave spent."""
    q, expected = _sampling(policy, run.train, n_examples)
    steps = run.train.local_steps
    if policy.noise_multiplier is not None:
        sigma = float(policy.noise_multiplier)
    else:  # calibrated so that the run's planned rounds together spend target-epsilon
        sigma = noise_for_target(policy, q, steps * run.num_rounds)
    history = ledger.history() if ledger is not None else []
    mine = ledger.history(run_id) if ledger is not None else []
    this = (sigma, q, steps)
    eps = _eps_fn(policy)
    return DPRound(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        expected_batch_size=expected,
        max_grad_norm=policy.max_grad_norm,
        delta=policy.delta,
        budget=policy.epsilon_budget,
        accountant=policy.accountant,
        spent_before=eps(history),
        spent_after=eps([*history, this]),
        run_before=eps(mine),
        run_after=eps([*mine, this]),
        ledger=ledger,
        run_id=run_id,
    )


def _eps_fn(policy: PrivacyPolicy) -> Any:
    return lambda history: epsilon_of(history, policy.delta, policy.accountant)


@contextmanager
def round_budget(
    policy: PrivacyPolicy | None,
    run: RunConfig,
    silo: SiloConfig,
    run_id: str,
    server_round: int,
    n_examples: int,
) -> Iterator[DPRound | None]:
    """Around one DP round: plan it, refuse it if it would pass the budget, hold the ledger's lock
    until the caller has trained and called ``commit()``. Yields None when the policy has no DP."""
    if policy is None:
        yield None
        return
    if not silo.state_dir:
        raise PolicyRefused(
            "the policy has [privacy] but the silo has no state-dir to keep its privacy ledger in"
        )
    check_private_run(run)
    ledger = Ledger(silo.state_dir, dataset_id(policy, silo))
    with ledger.locked():
        plan = plan_round(policy, run, n_examples, ledger, run_id)
        plan.server_round, plan.silo, plan.state_dir = server_round, silo.name, silo.state_dir
        if plan.spent_after > policy.epsilon_budget:
            reason = (
                f"round {server_round} of run {run_id} would spend epsilon {plan.spent_after:.4g} "
                f"on dataset {ledger.dataset!r} (spent so far {plan.spent_before:.4g}, delta "
                f"{policy.delta:g}); the policy's epsilon-budget is {policy.epsilon_budget:g}"
            )
            append_audit(
                silo.state_dir,
                "refused",
                silo=silo.name,
                run_id=run_id,
                phase="train",
                round=server_round,
                code="PRIVACY_BUDGET_EXHAUSTED",
                reason=reason,
                epsilon_spent=round(plan.spent_before, 6),
                epsilon_budget=policy.epsilon_budget,
            )
            raise PrivacyBudgetExhausted(reason)
        yield plan


def privacy_summary(state_dir: str | Path) -> list[dict[str, Any]]:
    """Per dataset and run: rounds and epsilon, from the ledgers (``silotune silo audit``).

    Epsilon per run is that run's rounds alone; the dataset's total composes all of them, at the
    delta each ledger's last round was spent at."""
    out = []
    for path in sorted((Path(state_dir) / PRIVACY_DIR).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        rounds = data.get("rounds", [])
        if not rounds:
            continue
        delta = float(rounds[-1]["delta"])
        runs: dict[str, list[tuple[float, float, int]]] = {}
        for e in rounds:
            runs.setdefault(str(e["run_id"]), []).append(
                (e["noise_multiplier"], e["sample_rate"], e["steps"])
            )
        every = [t for h in runs.values() for t in h]
        out.append(
            {
                "dataset": data.get("dataset"),
                "ledger": str(path),
                "delta": delta,
                "epsilon_spent": epsilon_of(every, delta),
                "runs": {rid: {"rounds": len(h), "epsilon": epsilon_of(h, delta)} for rid, h in runs.items()},
            }
        )
    return out


# -- DP-SGD ---------------------------------------------------------------------------------------------
def per_sample_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Each record's mean cross-entropy over its response tokens (labels != -100), shape (B,)."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = (labels != IGNORE_INDEX).to(ce.dtype)
    return (ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@contextmanager
def dp_wrapped(model: Any) -> Iterator[Any]:
    """The model under Opacus's GradSampleModule for one round; hooks and per-sample buffers go
    afterwards, so a resident worker's next (perhaps non-DP) round finds the plain model."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        try:
            yield gsm
        finally:
            gsm.remove_hooks()
            for p in model.parameters():
                for attr in ("grad_sample", "_current_grad_sample", "summed_grad", "_forward_counter"):
                    if hasattr(p, attr):
                        delattr(p, attr)


def make_dp_optimizer(opt: Any, plan: DPRound, device: Any) -> Any:
    import torch
    from opacus.optimizers import DPOptimizer

    noise = torch.Generator(device=device)
    noise.manual_seed(secrets.randbits(63))  # never the run's seed: the central site knows that
    return DPOptimizer(
        opt,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=noise,
    )


def dp_step(
    gsm: Any, dp_opt: Any, examples: list[Any], indices: list[int], micro: int, pad_id: int, device: Any
) -> tuple[float, int, int]:
    """Gradients of one Poisson batch, in micro-batches of ``micro`` records, then clipped per
    record, summed, noised and scaled by Opacus (``dp_opt.pre_step``); the caller steps.

    Returns (mean per-record loss, tokens, records); leaves the private gradient in ``p.grad``."""
    import torch

    params = list(dp_opt.params)
    dp_opt.zero_grad(set_to_none=True)
    chunks = [indices[i : i + micro] for i in range(0, len(indices), micro)]
    loss_sum, tokens = 0.0, 0
    if not chunks:  # an empty Poisson batch: no gradient, but the step's noise all the same
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    for k, chunk in enumerate(chunks):
        batch = {key: v.to(device) for key, v in collate([examples[i] for i in chunk], pad_id).items()}
        tokens += int(batch["attention_mask"].sum())
        losses = per_sample_loss(gsm, batch)
        losses.mean().backward()
        loss_sum += float(losses.detach().sum())
        if k < len(chunks) - 1:  # clip and accumulate this micro-batch; the step comes at the end
            dp_opt.signal_skip_step(do_skip=True)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    if not dp_opt.pre_step():
        raise RuntimeError("Opacus skipped the step's noise")  # cannot happen: no skip is queued
    return loss_sum / max(len(indices), 1), tokens, len(indices)


def train_round_dp(
    model: Any,
    tokenizer: Any,
    examples: list[Encoded],
    settings: TrainSettings,
    lr: float,
    seed: int,
    plan: DPRound,
    proximal_mu: float = 0.0,
    progress: Any = None,
    optimizer_state: OptimizerState | None = None,
) -> TrainResult:
    """``training.train_round`` under DP-SGD: ``plan.steps`` steps, each on a Poisson batch.

    The steps are training's own (``run_steps``); only the gradient differs. FedProx's term is
    data-independent: it is added to the private gradient after the noise. ``train.max-grad-norm``
    (the global clip) does not apply: the per-sample clip replaces it."""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if not examples:
        raise ValueError("no training examples")
    device = next(p.device for p in model.parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = {n: p.detach().float().clone() for n, p in named}
    # Dropout is seeded by the run's seed; the privacy-relevant draws use secret generators.
    opt = make_optimizer(named, settings, lr, optimizer_state, seed)
    draw = torch.Generator()
    draw.manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples), sample_rate=plan.sample_rate, generator=draw, steps=plan.steps
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with dp_wrapped(model) as gsm:
        dp_opt = make_dp_optimizer(opt, plan, device)

        def backward(indices: list[int]) -> tuple[float | None, int]:
            loss, tokens, drawn = dp_step(gsm, dp_opt, examples, indices, settings.batch_size, pad_id, device)
            if proximal_mu > 0:
                for n, p in named:
                    p.grad = p.grad + proximal_mu * (p.detach().float() - anchor[n]).to(p.dtype)
            return (loss if drawn else None), tokens

        try:
            return run_steps(
                model, named, opt, anchor, sampler, backward, settings, lr, len(examples), progress,
                max_grad_norm=math.inf,
            )  # fmt: skip
        finally:
            dp_opt.zero_grad(set_to_none=True)
