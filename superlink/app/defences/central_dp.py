"""Central differential privacy on the aggregate: server-side clipping, Gaussian noise, accounting.

The mechanism is DP-FedAvg with a fixed clip (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"; Flower's ``DifferentialPrivacyServerSideFixedClipping``), on the pure
numpy ``{key: array}`` adapters of SiloTune's round loop (``[central-dp]`` in the run config,
silotune/config.py CentralDPSettings; docs/privacy.md "Central DP (server-side)"):

1. every silo's delta, its update minus exactly what it was sent this round, flattened over ALL
   adapter tensors together, is clipped to L2 norm ``C = clipping-norm`` (:func:`clip_update`);
2. the clipped deltas are SUMMED and divided by a fixed, data-independent denominator ``n``: the
   number of silos the round asked (``num_sampled``). When every asked silo answers, this is the
   equal-weight mean. A silo that was asked but did not answer, or whose reply was rejected,
   adds a zero delta. That is the "add or remove one silo" neighbour that the accountant assumes.
   Dividing by the number of answers instead would shrink the denominator below what the noise was
   sized for; Flower's wrapper warns about exactly that (CLIENTS_DISCREPANCY_WARNING);
3. Gaussian noise of std ``z·C/n`` (``z = noise-multiplier``) is added to every coordinate of that
   mean (:func:`add_noise`). The new global adapter is the global plus the noisy mean delta
   (:func:`central_dp_aggregate`).

What it protects. The unit is a silo: its whole contribution in a round (user-level DP over
silos, not record-level). On the add/remove relation, the sum of clipped deltas has sensitivity
``C``, and the released sequence of global adapters is (epsilon, delta)-DP with respect to any one
silo contributing or not. If a silo's data is *replaced* by other data, its clipped delta
can move by up to 2C; under that relation the same noise gives the guarantee of noise multiplier
z/2. The protection is against whoever sees the global adapter: the silos, anyone the adapter or a
checkpoint is given to, and evaluations run on it. It is NOT against the central site itself.
The central site sees every raw update before clipping. The per-silo figures in the report
(``CDP_UPDATE_NORM``, ``CDP_CLIP_FACTOR``) are computed from raw updates and are not
noised, so they are for the central site's own logs only.

Why the example-weighted and robust aggregators are bypassed. The sensitivity bound needs each
silo's influence on the release to be at most ``C/n`` whatever the other silos send:
  * example weights (FedAvg's ``num-examples``) are declared by the silos, unbounded and not noised.
    A weight share ``w`` makes the sensitivity ``w·C`` instead of ``C/n``, and the weights themselves
    leak. ``strategy.max-weight-share`` would bound it at ``max-weight-share·C``, which needs
    ``n·max-weight-share`` times the noise for the same epsilon. Equal weights are the cheapest sound
    choice;
  * robust selection (``consensus``, ``multi-krum``, trimmed mean, median), relative clipping
    (``strategy.clip-relative``, a multiple of the median of the OTHER silos' norms) and exclusion of
    flagged silos over rounds all decide one silo's share from the others' updates. Changing one
    silo's data can then move other silos' contributions too, so no per-silo bound holds.
  * the defences' own clipping (``clip_factor`` in superlink/app/defences/__init__.py) bounds each
    module's *effective* update s·B·A, not the parameters that are averaged and noised.
    ``||s·ΔB·A||`` small does not bound ``||ΔA||``, so it gives no sensitivity for noise added to the
    A and B tensors. This module clips the parameter delta itself, all tensors in one vector.
Checks of a reply against itself (shapes, dtype, finiteness; superlink/app/reply_checks.py) stay
sound: dropping a bad reply is that silo's own zero delta. What composes after the release is
post-processing: a server optimizer (FedAvgM, FedAdam) may take the noisy global as its one
update (:func:`release_as_update`), and evaluation or checkpoints of the noisy adapter are also
post-processing. FlexLoRA (per-silo ranks, updates of different shapes) is refused by the config.

Accounting (:class:`CentralAccountant`): one sampled-Gaussian step per released round, with noise
multiplier z and sampling rate q, in Opacus's ``RDPAccountant``, which is the accountant the silos use
for their DP-SGD (silo_node/app/privacy.py). Opacus's analysis assumes Poisson sampling with a
secret coin per silo. The q-subsampled bound (q = sampled silos / connected silos) therefore
applies only when silos are sampled that way. SiloTune's ``round_core.sample_round`` draws a
fixed-size sample seeded from ``train.seed``, which every silo knows, so it gives no amplification.
``SAMPLE_RATE`` is therefore q = 1 (no amplification). With every silo in every round, q = 1 anyway.

Randomness: the noise must be secret from everyone who sees the adapter, above all the silos.
Those silos know ``train.seed``, so never seed it from the seed. :func:`secret_rng` draws a
numpy Generator from the OS's entropy. The noise is floating-point Gaussian. Like Opacus without
``secure_mode``, it does not resist the floating-point attacks of Mironov (2012).

Flower's helpers (flwr 1.41 keeps them in ``flwr.supercore.differential_privacy``; there is no
``flwr.common.differential_privacy`` any more) and which ones are used:
  * used: ``compute_stdv`` (std = z·C/n, the very formula of Flower's wrapper) and ``get_norm`` (the
    L2 norm of a list of arrays, flattened together), on float64 copies;
  * not used: ``compute_clip_model_update`` / ``clip_inputs_inplace``, because they clip lists in place,
    return no factor, and divide by the norm as a Python float, so a silo that sends back
    an unchanged adapter (norm 0) raises ZeroDivisionError; ``add_gaussian_noise_inplace`` /
    ``add_gaussian_noise_to_params``, because they draw from numpy's global, seedable
    ``np.random`` state, cannot take our secret Generator, and the second works on legacy ``Parameters``;
  * not used: the ``DifferentialPrivacyServerSideFixedClipping`` strategy wrapper, because it wraps
    Flower's own strategy loop over Messages, which SiloTune does not run (its round loop and
    strategies are pure numpy); Flower's ``flwr.supercore.privacy_accounting.RdpAccountant``
    needs Google's ``dp-accounting`` package (not installed), and Flower accepts only its
    no-amplification mode with fixed clipping. With Opacus, the silos' and the central site's
    epsilons come from one piece of code.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_stdv, get_norm

from silotune import protocol as p
from silotune.config import CentralDPSettings
from superlink.app.strategies.base import SiloUpdate

__all__ = [
    "CentralAccountant",
    "add_noise",
    "central_dp_aggregate",
    "clip_update",
    "release_as_update",
    "round_refusal",
    "secret_rng",
]

ACCOUNTANT_VERSION = 1


def secret_rng() -> np.random.Generator:
    """A numpy Generator seeded from the OS's entropy (never from train.seed, which silos know)."""
    return np.random.default_rng(secrets.randbits(128))


# -- the mechanism ------------------------------------------------------------------------------------
def clip_update(delta: Mapping[str, np.ndarray], norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``norm``, over all its tensors flattened together.

    Returns ``(clipped, factor)`` with ``factor = min(1, norm / ||delta||)`` (1 for a zero delta);
    ``clipped`` is float64, same keys and shapes. A non-finite delta is refused (ValueError): the
    reply checks reject those before aggregation, and NaN would slip past any bound.
    """
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError(f"clipping norm must be positive and finite, got {norm!r}")
    d64 = {k: np.asarray(v, dtype=np.float64) for k, v in delta.items()}
    total = get_norm(list(d64.values())) if d64 else 0.0
    if not math.isfinite(total):
        raise ValueError("a silo's update is not finite; it cannot be clipped")
    factor = 1.0 if total <= norm else norm / total
    if factor < 1.0:
        d64 = {k: v * factor for k, v in d64.items()}
    return d64, float(factor)


def add_noise(
    aggregate_delta: Mapping[str, np.ndarray],
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``aggregate_delta`` plus i.i.d. Gaussian noise of std ``noise_multiplier·clipping_norm/num_sampled``
    on every coordinate (Flower's ``compute_stdv``), in float64. ``aggregate_delta`` is the sum of the
    clipped deltas over ``num_sampled``. A noise multiplier of 0 adds nothing (tests only: the
    config requires > 0)."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise multiplier must be >= 0 and finite, got {noise_multiplier!r}")
    if num_sampled < 1:
        raise ValueError(f"num_sampled must be at least 1, got {num_sampled!r}")
    std = compute_stdv(noise_multiplier, clipping_norm, num_sampled)
    out: dict[str, np.ndarray] = {}
    for k, v in aggregate_delta.items():
        v64 = np.asarray(v, dtype=np.float64)
        out[k] = v64 + rng.normal(0.0, std, size=v64.shape) if std > 0 else v64.copy()
    return out


def central_dp_aggregate(
    global_state: Mapping[str, np.ndarray],
    updates_states: list[Mapping[str, np.ndarray]],
    sent: list[Mapping[str, np.ndarray]],
    settings: CentralDPSettings,
    rng: np.random.Generator,
    *,
    num_sampled: int | None = None,
    accountant: CentralAccountant | None = None,
    sample_rate: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One round's central-DP release: global + (Σ clip(update_i − sent_i)) / n + N(0, (z·C/n)²).

    ``sent[i]`` is exactly what ``updates_states[i]``'s silo received (with a quantized transport:
    the dequantized payload, as the defences use). ``num_sampled`` is ``n``, the number of silos the
    round ASKED (default: the number of updates). Pass it whenever some did not answer or were
    rejected, so that the denominator and the noise do not depend on who answered. With
    ``accountant``, the release is charged to it at ``sample_rate`` (``SAMPLE_RATE`` in a run) after
    the noise is drawn, and the report gives the epsilon.

    Returns the new global state (each tensor in the global's dtype, float32 on the wire), and a
    report keyed by ``silotune.protocol``'s names: the round's ``CDP_FIELDS``
    (``CDP_EPSILON``/``CDP_DELTA`` only with an accountant), and per silo, in input order,
    ``CDP_UPDATE_NORM`` and ``CDP_CLIP_FACTOR`` (lists; raw figures, not noised). With no updates
    nothing is released, nothing is charged, and the global comes back unchanged.
    """
    m = len(updates_states)
    if len(sent) != m:
        raise ValueError(f"{m} updates but {len(sent)} payloads they were measured against")
    n = m if num_sampled is None else int(num_sampled)
    if n < m:
        raise ValueError(f"num_sampled={n} is below the {m} updates summed: the noise would be too small")
    z, c = float(settings.noise_multiplier), float(settings.clipping_norm)
    report: dict[str, Any] = {
        p.CDP_NOISE_MULTIPLIER: z,
        p.CDP_CLIPPING_NORM: c,
        p.CDP_NUM_SAMPLED: n,
        p.CDP_NUM_UPDATES: m,
        p.CDP_NUM_CLIPPED: 0,
        p.CDP_NOISE_STD: 0.0,
        p.CDP_UPDATE_NORM: [],
        p.CDP_CLIP_FACTOR: [],
    }
    if m == 0:
        return dict(global_state), report
    keys = list(global_state)
    total = {k: np.zeros(np.shape(global_state[k]), dtype=np.float64) for k in keys}
    for i, (upd, ref) in enumerate(zip(updates_states, sent, strict=True)):
        if set(upd) != set(keys) or set(ref) != set(keys):
            raise ValueError(f"update {i}: its tensors are not the global adapter's")
        for k in keys:
            if np.shape(upd[k]) != np.shape(global_state[k]) or np.shape(ref[k]) != np.shape(upd[k]):
                raise ValueError(f"update {i}: {k} has shape {np.shape(upd[k])}, not the global's")
        delta = {k: np.asarray(upd[k], dtype=np.float64) - np.asarray(ref[k], dtype=np.float64) for k in keys}
        raw = get_norm(list(delta.values()))
        clipped, factor = clip_update(delta, c)
        for k in keys:
            total[k] += clipped[k]
        report[p.CDP_UPDATE_NORM].append(float(raw))
        report[p.CDP_CLIP_FACTOR].append(factor)
        report[p.CDP_NUM_CLIPPED] += int(factor < 1.0)
    noisy = add_noise({k: v / n for k, v in total.items()}, z, c, n, rng)
    report[p.CDP_NOISE_STD] = compute_stdv(z, c, n)
    new_state = {
        k: (np.asarray(global_state[k], dtype=np.float64) + noisy[k]).astype(
            np.asarray(global_state[k]).dtype
        )
        for k in keys
    }
    if accountant is not None:
        accountant.step(z, sample_rate)
        report[p.CDP_SAMPLE_RATE] = float(sample_rate)
        report[p.CDP_EPSILON] = accountant.epsilon(settings.target_delta)
        report[p.CDP_DELTA] = float(settings.target_delta)
    return new_state, report


def release_as_update(state: Mapping[str, np.ndarray]) -> SiloUpdate:
    """The released global as the single update of a server optimizer (FedAvgM, FedAdam): what the
    optimizer does with it is post-processing of the DP release, so the guarantee is unchanged."""
    return SiloUpdate(node_id=0, state=dict(state), num_examples=1, weight=1.0)


# -- accounting -------------------------------------------------------------------------------------
# q every round is charged at. Opacus's subsampled bound (q = sampled / connected) assumes Poisson
# sampling with coins nobody else sees; SiloTune's ``round_core.sample_round`` is fixed-size and
# seeded from ``train.seed``, which the silos know, so it earns no amplification: q = 1.
SAMPLE_RATE = 1.0


def _check_step(noise_multiplier: float, sample_rate: float) -> tuple[float, float]:
    z, q = float(noise_multiplier), float(sample_rate)
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"noise multiplier must be positive and finite, got {noise_multiplier!r}")
    if not 0 < q <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    return z, q


class CentralAccountant:
    """The central mechanism's epsilon: Opacus's ``RDPAccountant``, stepped once per released round
    with ``(noise multiplier z, sample rate q)``.

    User-level DP over silos, on the add/remove relation (module docstring). The q-subsampled
    bound holds only if silos are sampled at random, Poisson-like, with coins secret from the
    adversary; with every silo every round (or the seeded fixed-size sampling SiloTune does), charge
    q = 1. The RDP to (epsilon, delta) conversion is an upper bound. The state is
    ``{"version", "mechanism", "history"}`` (:meth:`to_dict`), small enough for the checkpoint
    manifest (``protocol.CDP_MANIFEST_KEY``), so a resumed run keeps what it has spent.
    """

    MECHANISM = "rdp"

    def __init__(self, history: list[tuple[float, float, int]] | None = None) -> None:
        self.history: list[tuple[float, float, int]] = [
            (float(z), float(q), int(k)) for z, q, k in (history or [])
        ]

    @staticmethod
    def _opacus(history: list[tuple[float, float, int]]) -> Any:
        from opacus.accountants import RDPAccountant  # lazily: opacus imports torch

        acc = RDPAccountant()
        if history:
            acc.load_state_dict({"history": list(history), "mechanism": RDPAccountant.mechanism()})
        return acc

    @property
    def rounds(self) -> int:
        """Releases charged so far."""
        return sum(k for _, _, k in self.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Charge one released round (Opacus merges equal consecutive steps into one entry)."""
        z, q = _check_step(noise_multiplier, sample_rate)
        acc = self._opacus(self.history)
        acc.step(noise_multiplier=z, sample_rate=q)
        self.history = [(float(a), float(b), int(c)) for a, b, c in acc.history]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first release)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not self.history:
            return 0.0
        return float(self._opacus(self.history).get_epsilon(delta=delta))

    def epsilon_after(self, delta: float, sample_rate: float, noise_multiplier: float) -> float:
        """Epsilon at ``delta`` if one more round were released with ``(z, q)``; nothing is charged."""
        z, q = _check_step(noise_multiplier, sample_rate)
        trial = CentralAccountant(self.history)
        trial.step(z, q)
        return trial.epsilon(delta)

    def would_exceed(
        self, max_epsilon: float, delta: float, sample_rate: float, noise_multiplier: float
    ) -> bool:
        """Whether the next round's release would take epsilon past ``max_epsilon`` (0 or less: no
        limit). Ask it before the round is sent out; a True means the round must not run."""
        if max_epsilon <= 0:
            return False
        return self.epsilon_after(delta, sample_rate, noise_multiplier) > max_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": ACCOUNTANT_VERSION,
            "mechanism": self.MECHANISM,
            "history": [[z, q, k] for z, q, k in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CentralAccountant:
        """The inverse of :meth:`to_dict`; ``None`` or ``{}`` (a checkpoint from before central DP)
        is a fresh accountant. Anything malformed is refused (ValueError), never read as zero."""
        if not data:
            return cls()
        if data.get("version") != ACCOUNTANT_VERSION or data.get("mechanism") != cls.MECHANISM:
            raise ValueError(
                f"central DP accountant state of version {data.get('version')!r}, mechanism "
                f"{data.get('mechanism')!r}: expected version {ACCOUNTANT_VERSION}, {cls.MECHANISM!r}"
            )
        history = []
        for entry in data.get("history", []):
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"central DP accountant history entry {entry!r} is not [z, q, steps]")
            z, q = _check_step(entry[0], entry[1])
            k = entry[2]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"central DP accountant history entry {entry!r}: steps must be >= 1")
            history.append((z, q, k))
        return cls(history)


def round_refusal(
    accountant: CentralAccountant, settings: CentralDPSettings, sample_rate: float
) -> str | None:
    """Why the next round must not run (its release would pass ``central-dp.max-epsilon``), or None."""
    if not accountant.would_exceed(
        settings.max_epsilon, settings.target_delta, sample_rate, settings.noise_multiplier
    ):
        return None
    after = accountant.epsilon_after(settings.target_delta, sample_rate, settings.noise_multiplier)
    return (
        f"the next round's release would spend central epsilon {after:.4g} at delta "
        f"{settings.target_delta:g} (spent so far {accountant.epsilon(settings.target_delta):.4g} in "
        f"{accountant.rounds} round(s)); central-dp.max-epsilon is {settings.max_epsilon:g}"
    )


@dataclass
class CentralDP:
    """One run's central mechanism: its settings, its accountant (persisted in every checkpoint's
    manifest under ``CDP_MANIFEST_KEY``) and its secret noise source."""

    settings: CentralDPSettings
    accountant: CentralAccountant = field(default_factory=CentralAccountant)
    rng: np.random.Generator = field(default_factory=secret_rng)

    @classmethod
    def for_run(cls, settings: CentralDPSettings, saved: Mapping[str, Any] | None = None) -> CentralDP | None:
        """None unless ``central-dp.enabled``; ``saved``: the accountant of a resumed run's checkpoint."""
        if not settings.enabled:
            return None
        return cls(settings, CentralAccountant.from_dict(saved))

    def refusal(self) -> str | None:
        """Why the next round must not run (central-dp.max-epsilon), or None. Rounds are charged at
        q = 1 (``SAMPLE_RATE``: SiloTune's sampling is seeded, not secret)."""
        return round_refusal(self.accountant, self.settings, SAMPLE_RATE)

    def release(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: list[SiloUpdate],
        sent: Mapping[int, Mapping[str, np.ndarray]],
        num_sampled: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """This round's noisy global adapter and its report (``central_dp_aggregate``), charged."""
        return central_dp_aggregate(
            global_state,
            [u.state for u in updates],
            [sent[u.node_id] for u in updates],
            self.settings,
            self.rng,
            num_sampled=num_sampled,
            accountant=self.accountant,
            sample_rate=SAMPLE_RATE,
        )
