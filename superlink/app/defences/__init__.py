"""Bounded influence for every silo: weight caps, update-norm clipping, anomaly scores, robust selection.

Pure numpy (no Flower, no torch), so the round loop (superlink/app/rounds.py) and the in-process
benchmark (benchmarks/poisoned_silo.py) run the very same defences.

What "a silo's update" means here. Per module, the change the silo proposes to the module's
*effective* weight, relative to what the strategy sent it:

    ΔW_i = s·B_i·A_i − s·B_ref·A_ref          (LoRA pair; s = peft.alpha / rank, PEFT's scaling)
    Δx_i = x_i − x_ref                        (any other tensor: IA3 vectors, DoRA magnitudes, biases)

ΔW_i is never formed. It is the product X_i·Y_i of X_i = [s·B_i, −s·B_ref] (out × 2r) and
Y_i = [A_i; A_ref] (2r × in), so every inner product is taken in factored form,

    <X_i Y_i, X_j Y_j> = trace((X_iᵀ X_j)(Y_j Y_iᵀ)),

from (2r × 2r) matrices, and norms and distances follow from that Gram matrix:
||ΔW_i − ΔW_j||² = G_ii + G_jj − 2·G_ij. Ranks may differ between silos (FlexLoRA).

Order within a round (``Defence.apply``):
1. weight caps: every silo's weight is its example count as declared at the handshake (the round
   loop enforces that), or 1 under ``strategy.weighting = "equal"``, and no silo's share exceeds
   ``strategy.max-weight-share``;
2. the Gram matrix of the updates, per module, before any clipping;
3. anomaly scores from it (the distance of each update from the others, its norm relative to the
   others' median) — what the round loop exports and counts towards exclusion;
4. robust selection (``strategy.aggregator``, superlink/app/defences/aggregators.py): per module, which
   silos the average uses;
5. clipping of each module's update to ``min(strategy.clip-norm, strategy.clip-relative × lower
   median norm)``, by moving the silo's factors towards what it was sent: B(c) = B_ref + c·(B − B_ref),
   A(c) = A_ref + c·(A − A_ref) with the c at which ||ΔW(c)|| equals the bound (a quartic in c,
   solved exactly), so a clipped update is still a rank-r pair in the silo's own basis.
The strategy then aggregates with the resulting per-key weights (SiloUpdate.key_weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from silotune.adapters import A_SUFFIX, B_SUFFIX, lora_modules
from silotune.config import StrategySettings
from superlink.app.defences.aggregators import distances_from_gram, get_aggregator
from superlink.app.strategies.base import SiloUpdate


def module_groups(state: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    """State keys grouped by module: a LoRA pair (A, B) under its prefix, any other tensor alone."""
    groups: dict[str, tuple[str, ...]] = {m: (m + A_SUFFIX, m + B_SUFFIX) for m in lora_modules(state)}
    paired = {k for keys in groups.values() for k in keys}
    for key in state:
        if key not in paired:
            groups[key] = (key,)
    return dict(sorted(groups.items()))


def cap_weights(counts: list[float], max_share: float) -> np.ndarray:
    """Shares proportional to ``counts``, none above ``max_share`` (water-filling), summing to 1.

    The excess of a capped silo goes to the others in proportion to their counts. When
    ``max_share * n < 1`` no feasible assignment exists and every silo gets 1/n (the closest).
    """
    w = np.asarray(counts, dtype=np.float64)
    n = w.size
    if n == 0:
        return w
    if max_share * n <= 1.0 + 1e-12 or not np.all(np.isfinite(w)) or w.sum() <= 0:
        return np.full(n, 1.0 / n)
    capped = np.zeros(n, dtype=bool)
    shares = w / w.sum()
    for _ in range(n):
        free = ~capped
        remaining = 1.0 - max_share * capped.sum()
        shares = np.where(capped, max_share, remaining * w / w[free].sum())
        over = free & (shares > max_share * (1 + 1e-12))
        if not over.any():
            break
        capped |= over
    return np.where(capped, max_share, shares)


def _lora_scale(alpha: float, a: np.ndarray) -> float:
    return float(alpha) / float(a.shape[0])


def _factors(
    state: dict[str, np.ndarray], ref: dict[str, np.ndarray], module: str, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) with X @ Y = s·B·A − s_ref·B_ref·A_ref for one LoRA module, in float64."""
    a, b = state[module + A_SUFFIX].astype(np.float64), state[module + B_SUFFIX].astype(np.float64)
    ar, br = ref[module + A_SUFFIX].astype(np.float64), ref[module + B_SUFFIX].astype(np.float64)
    x = np.hstack([_lora_scale(alpha, a) * b, -_lora_scale(alpha, ar) * br])
    return x, np.vstack([a, ar])


def factored_gram(xs: list[np.ndarray], ys: list[np.ndarray]) -> np.ndarray:
    """G_ij = <X_i Y_i, X_j Y_j>_F = trace((X_iᵀX_j)(Y_jY_iᵀ)) without forming any X_i Y_i."""
    sizes = [x.shape[1] for x in xs]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    xx = np.hstack(xs).T @ np.hstack(xs)  # (K, K), K = sum of the stacked ranks
    yy = np.vstack(ys) @ np.vstack(ys).T
    n = len(xs)
    g = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            bi, bj = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            # trace(P Q) = sum(P * Qᵀ); here P = X_iᵀX_j, Qᵀ = (Y_jY_iᵀ)ᵀ = Y_iY_jᵀ.
            g[i, j] = g[j, i] = float(np.sum(xx[bi, bj] * yy[bi, bj]))
    return g


def module_grams(
    states: list[dict[str, np.ndarray]], refs: list[dict[str, np.ndarray]], alpha: float
) -> dict[str, np.ndarray]:
    """Per module, the Gram matrix of the silos' effective updates (see the module docstring)."""
    grams: dict[str, np.ndarray] = {}
    for module, keys in module_groups(states[0]).items():
        if len(keys) == 2:
            pairs = [_factors(s, r, module, alpha) for s, r in zip(states, refs, strict=True)]
            grams[module] = factored_gram([p[0] for p in pairs], [p[1] for p in pairs])
        else:
            d = np.stack(
                [
                    (s[module].astype(np.float64) - r[module]).ravel()
                    for s, r in zip(states, refs, strict=True)
                ]
            )
            grams[module] = d @ d.T
    return grams


def _inner(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray) -> float:
    return float(np.sum((x1.T @ x2) * (y1 @ y2.T)))


def clip_factor(
    state: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    keys: tuple[str, ...],
    alpha: float,
    bound: float,
) -> float:
    """Largest c in [0, 1] with ||update(c)|| <= bound, where update(c) interpolates the factors.

    LoRA: with ΔB = B − B_ref, ΔA = A − A_ref, the update at c is c·L + c²·Q where
    L = s(ΔB·A_ref + B_ref·ΔA) and Q = s·ΔB·ΔA; its squared norm c²<L,L> + 2c³<L,Q> + c⁴<Q,Q> is a
    quartic whose smallest root in (0, 1] is where the norm first reaches the bound.
    """
    if len(keys) == 1:
        norm = float(np.linalg.norm(state[keys[0]].astype(np.float64) - ref[keys[0]]))
        return 1.0 if norm <= bound else bound / norm
    ka, kb = keys
    a, b = state[ka].astype(np.float64), state[kb].astype(np.float64)
    ar, br = ref[ka].astype(np.float64), ref[kb].astype(np.float64)
    if a.shape != ar.shape:  # only when a strategy sends another rank than it receives
        return 1.0
    s = _lora_scale(alpha, a)
    da, db = a - ar, b - br
    lx, ly = np.hstack([s * db, s * br]), np.vstack([ar, da])
    qx, qy = s * db, da
    ll, lq, qq = _inner(lx, ly, lx, ly), _inner(lx, ly, qx, qy), _inner(qx, qy, qx, qy)
    full = ll + 2 * lq + qq
    if full <= bound * bound:
        return 1.0
    roots = np.roots([qq, 2 * lq, ll, 0.0, -bound * bound])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 * (1 + abs(r)) and 0 < r.real <= 1 + 1e-9]
    if real:
        return min(1.0, min(real))
    # Rounding hid the root: bisection on the (continuous) norm, which is 0 at c=0 and > bound at 1.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid * mid * ll + 2 * mid**3 * lq + mid**4 * qq <= bound * bound:
            lo = mid
        else:
            hi = mid
    return lo


def apply_clip(
    state: dict[str, np.ndarray], ref: dict[str, np.ndarray], keys: tuple[str, ...], c: float
) -> None:
    """Move ``keys`` of ``state`` to ref + c·(state − ref), in place (float32, as on the wire)."""
    for k in keys:
        r = ref[k].astype(np.float64)
        state[k] = (r + c * (state[k].astype(np.float64) - r)).astype(np.float32)


@dataclass
class SiloScore:
    """One silo's figures in one round (what the anomaly_score event carries)."""

    node_id: int
    norm: float  # ||update|| over all modules
    norm_ratio: float  # its norm / the median norm of the other silos
    distance: float  # median distance to the other updates / the round's median norm
    cosine: float  # cosine of its update with the sum of the others' (1: same direction, -1: opposed)
    flagged: bool
    weight_share: float  # capped share of the round's weight
    clip_factor: float  # smallest clipping factor over its modules (1: not clipped)
    modules_used: float  # fraction of modules whose average uses this silo

    def figures(self) -> str:
        """What flagged it, for the log and the exclusion reason."""
        return (
            f"distance {self.distance:.3g}, norm {self.norm_ratio:.3g} x the others' median, "
            f"cosine with the others' update {self.cosine:.3g}"
        )


@dataclass
class DefenceReport:
    scores: list[SiloScore] = field(default_factory=list)
    aggregator: str = "mean"

    def by_node(self) -> dict[int, SiloScore]:
        return {s.node_id: s for s in self.scores}


def _lower_median(x: np.ndarray) -> float:
    return float(np.sort(x)[(x.size - 1) // 2])


def anomaly_scores(
    g: np.ndarray, threshold: float, min_cosine: float = -1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(norms, norm ratios, distance scores, cosines, flags) from the whole-update Gram matrix ``g``.

    distance_i = lowmed_j≠i ||Δ_i − Δ_j|| / median_k ||Δ_k||, norm_ratio_i = ||Δ_i|| / lowmed_j≠i ||Δ_j||,
    where lowmed is the lower median (of two values, the smaller): so one far-off silo does not make
    the honest ones look far off too, also with three silos. cosine_i = <Δ_i, Σ_j≠i Δ_j> /
    (||Δ_i|| ||Σ_j≠i Δ_j||), all from ``g`` (no update is formed). A silo is flagged when the ratio or
    the distance exceeds ``threshold`` or the cosine is below ``min_cosine``; with fewer than 3
    silos nobody is flagged (two disagreeing updates do not say which one is wrong).
    """
    n = g.shape[0]
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    dist = distances_from_gram(g)
    ratios, scores, cosines = np.zeros(n), np.zeros(n), np.ones(n)
    med = float(np.median(norms)) if n else 0.0
    tiny = 1e-30
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if not others:
            continue
        other_med = _lower_median(norms[others])
        ratios[i] = norms[i] / other_med if other_med > tiny else (0.0 if norms[i] <= tiny else np.inf)
        d = _lower_median(dist[i, others])
        scores[i] = d / med if med > tiny else (0.0 if d <= tiny else np.inf)
        rest = float(g[np.ix_(others, others)].sum())  # ||Σ_j≠i Δ_j||²
        denom = norms[i] * np.sqrt(max(rest, 0.0))
        # A zero update, or zero others, has no direction: it is not "against" anything.
        cosines[i] = float(np.clip(g[i, others].sum() / denom, -1.0, 1.0)) if denom > tiny else 1.0
    flags = (ratios > threshold) | (scores > threshold) | (cosines < min_cosine)
    if n < 3:
        flags = np.zeros(n, dtype=bool)
    return norms, ratios, scores, cosines, flags


def declared_weights(updates: list[SiloUpdate], weighting: str) -> list[float]:
    """Each silo's weight before the caps: its declared example count (FedAvg), or 1 (``equal``).

    ``equal`` fits silos that each stand for one kind of text, and a score that averages one
    benchmark per kind: a silo with 10x the rows does not get 10x the say (and a silo that lies
    about its count gains nothing).
    """
    if weighting == "equal":
        return [1.0] * len(updates)
    return [float(u.num_examples) for u in updates]


class Defence:
    """Applies caps, scoring, robust selection and clipping to one round's validated updates."""

    def __init__(self, settings: StrategySettings, alpha: float) -> None:
        self.settings, self.alpha = settings, float(alpha)
        self.aggregator = get_aggregator(settings.aggregator)

    def apply(self, updates: list[SiloUpdate], refs: list[dict[str, np.ndarray]]) -> DefenceReport:
        """Mutates ``updates`` (weights, key weights, clipped states); returns the round's figures.

        ``refs[i]`` is what the strategy sent ``updates[i]``'s silo this round.
        """
        st = self.settings
        n = len(updates)
        report = DefenceReport(aggregator=st.aggregator)
        if n == 0:
            return report
        declared = declared_weights(updates, st.weighting)
        shares = cap_weights(declared, st.max_weight_share)
        groups = module_groups(updates[0].state)
        grams = module_grams([u.state for u in updates], refs, self.alpha)
        total = sum(grams.values())
        norms, ratios, dist, cosines, flags = anomaly_scores(
            total, st.anomaly_threshold, st.anomaly_min_cosine
        )
        masks = self.aggregator.select(grams, st)
        clip_min = np.ones(n)
        for module, keys in groups.items():
            mod_norms = np.sqrt(np.maximum(np.diag(grams[module]), 0.0))
            bounds = []
            if st.clip_norm > 0:
                bounds.append(st.clip_norm)
            if st.clip_relative > 0:
                # The lower median: of two silos, the smaller norm, so that one of two cannot
                # raise its own bound (the plain median of 2 is their mean, i.e. half the liar's).
                bounds.append(st.clip_relative * _lower_median(mod_norms))
            if bounds:
                bound = min(bounds)
                for i, u in enumerate(updates):
                    if mod_norms[i] > bound:
                        c = clip_factor(u.state, refs[i], keys, self.alpha, bound)
                        apply_clip(u.state, refs[i], keys, c)
                        clip_min[i] = min(clip_min[i], c)
            # Caps again among the silos this module's average uses: selection must not
            # hand a capped silo a larger share by dropping the others.
            mask = masks[module]
            mod_shares = np.zeros(n)
            mod_shares[mask] = cap_weights([declared[i] for i in np.flatnonzero(mask)], st.max_weight_share)
            for i, u in enumerate(updates):
                for k in keys:
                    u.key_weights[k] = float(mod_shares[i])
        used = np.mean([masks[m] for m in groups], axis=0) if groups else np.ones(n)
        for i, u in enumerate(updates):
            u.weight = float(shares[i])
            report.scores.append(
                SiloScore(
                    u.node_id,
                    float(norms[i]),
                    float(ratios[i]),
                    float(dist[i]),
                    float(cosines[i]),
                    bool(flags[i]),
                    float(shares[i]),
                    float(clip_min[i]),
                    float(used[i]),
                )
            )
        return report
