"""Bounded influence (superlink/app/defences/) and the robust aggregators
(superlink/app/defences/aggregators.py), against values computed by hand and against dense numpy
where the code stays factored."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from silotune.adapters import A_SUFFIX, B_SUFFIX
from silotune.config import PeftSettings, StrategySettings
from superlink.app.defences import (
    Defence,
    anomaly_scores,
    apply_clip,
    cap_weights,
    clip_factor,
    factored_gram,
    module_grams,
)
from superlink.app.defences.aggregators import AGGREGATORS
from superlink.app.strategies import SiloUpdate, get_strategy

RNG = np.random.default_rng(0)
ALPHA = 16.0


def _settings(**kw: object) -> StrategySettings:
    base: dict[str, object] = {"clip_relative": 0.0, "max_weight_share": 1.0}
    base.update(kw)
    return StrategySettings(**base)


def _apply(values: list[float], aggregator: str, **kw: object) -> float:
    """Five one-number silos (key "w", reference 0, equal counts) through Defence + FedAvg."""
    st = _settings(aggregator=aggregator, **kw)
    updates = [SiloUpdate(i, {"w": np.array([v], np.float32)}, 10) for i, v in enumerate(values)]
    refs = [{"w": np.zeros(1, np.float32)} for _ in values]
    Defence(st, ALPHA).apply(updates, refs)
    out = get_strategy(st, PeftSettings()).aggregate(refs[0], updates)
    return float(out["w"][0])


# -- hand-computed aggregators --------------------------------------------------------------------------
# Updates 1, 2, 3, 4, 100 (f = max-byzantine = 1):
#   mean: 110 / 5 = 22
#   median: the medoid, 3 (sums of distances: 1->103, 2->102, 3->101, 4->102, 100->390)
#   trimmed-mean: drop the 2f = 2 farthest from the medoid 3 (100 at 97, 1 at 2): (2+3+4)/3 = 3
#   multi-krum: scores = sum of squared distances to the n-f-2 = 2 nearest: 1->1+4=5, 2->1+1=2,
#     3->2, 4->1+4=5, 100->96²+97²; keep n-f = 4 lowest: (1+2+3+4)/4 = 2.5
#   consensus: tolerance 1.5 x median norm 3 = 4.5; {1,2,3,4} pairwise within 3: (1+2+3+4)/4 = 2.5
@pytest.mark.parametrize(
    "aggregator,expected",
    [("mean", 22.0), ("median", 3.0), ("trimmed-mean", 3.0), ("multi-krum", 2.5), ("consensus", 2.5)],
)
def test_aggregators_against_hand_computed_values(aggregator: str, expected: float) -> None:
    assert _apply([1, 2, 3, 4, 100], aggregator) == pytest.approx(expected, rel=1e-6)


def test_every_aggregator_is_registered() -> None:
    assert sorted(AGGREGATORS) == ["consensus", "mean", "median", "multi-krum", "trimmed-mean"]


def _lora(out: int, inp: int, rank: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "m" + A_SUFFIX: (scale * RNG.normal(size=(rank, inp))).astype(np.float32),
        "m" + B_SUFFIX: (scale * RNG.normal(size=(out, rank))).astype(np.float32),
    }


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_fedavg_is_exact_on_identical_honest_updates(aggregator: str) -> None:
    ref = _lora(6, 5, 2)
    same = _lora(6, 5, 2)
    st = _settings(aggregator=aggregator, max_weight_share=0.5, clip_relative=3.0)
    updates = [SiloUpdate(i, copy.deepcopy(same), 10 + i) for i in range(5)]
    Defence(st, ALPHA).apply(updates, [ref] * 5)
    out = get_strategy(st, PeftSettings(rank=2)).aggregate(ref, updates)
    for k in same:
        np.testing.assert_allclose(out[k], same[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_flexlora_is_exact_on_identical_honest_updates_at_heterogeneous_ranks(aggregator: str) -> None:
    st = _settings(name="flexlora", aggregator=aggregator, max_weight_share=0.5, clip_relative=3.0)
    peft = PeftSettings(rank=4, alpha=ALPHA)
    strat = get_strategy(st, peft)
    glob = _lora(6, 5, 4)
    # One common effective update M of rank 2, sent by silos training at ranks 2, 3, 4, 4.
    b0, a0 = RNG.normal(size=(6, 2)), RNG.normal(size=(2, 5))
    m = b0 @ a0
    ranks = [2, 3, 4, 4]
    updates, refs = [], []
    for i, r in enumerate(ranks):
        b = np.hstack([b0, np.zeros((6, r - 2))]) / (ALPHA / r)
        a = np.vstack([a0, RNG.normal(size=(r - 2, 5))])
        updates.append(
            SiloUpdate(i, {"m" + A_SUFFIX: a.astype(np.float32), "m" + B_SUFFIX: b.astype(np.float32)}, 10, r)
        )
        refs.append(strat.payload_for(glob, r, 1))
    Defence(st, ALPHA).apply(updates, refs)
    out = strat.aggregate(glob, updates)
    r_out = out["m" + A_SUFFIX].shape[0]
    got = (ALPHA / r_out) * out["m" + B_SUFFIX].astype(np.float64) @ out["m" + A_SUFFIX]
    np.testing.assert_allclose(got, m, rtol=1e-4, atol=1e-4)


# -- factored norms and clipping -----------------------------------------------------------------------------
def test_factored_gram_matches_dense_products_at_different_ranks() -> None:
    xs = [RNG.normal(size=(7, r)) for r in (2, 3, 5)]
    ys = [RNG.normal(size=(r, 4)) for r in (2, 3, 5)]
    dense = np.stack([(x @ y).ravel() for x, y in zip(xs, ys, strict=True)])
    np.testing.assert_allclose(factored_gram(xs, ys), dense @ dense.T, rtol=1e-10)


def test_module_gram_is_the_gram_of_s_ba_minus_the_reference() -> None:
    ref, s1, s2 = _lora(6, 5, 3), _lora(6, 5, 3), _lora(6, 5, 3)
    g = module_grams([s1, s2], [ref, ref], ALPHA)["m"]
    s = ALPHA / 3

    def eff(st: dict[str, np.ndarray]) -> np.ndarray:
        return s * st["m" + B_SUFFIX].astype(np.float64) @ st["m" + A_SUFFIX]

    d = np.stack([(eff(x) - eff(ref)).ravel() for x in (s1, s2)])
    np.testing.assert_allclose(g, d @ d.T, rtol=1e-8)


def test_clipping_bounds_the_effective_update_exactly() -> None:
    ref, big = _lora(8, 6, 3), _lora(8, 6, 3, scale=10.0)
    keys = ("m" + A_SUFFIX, "m" + B_SUFFIX)
    s = ALPHA / 3
    c = clip_factor(big, ref, keys, ALPHA, bound=5.0)
    assert 0 < c < 1
    apply_clip(big, ref, keys, c)
    eff = s * (
        big[keys[1]].astype(np.float64) @ big[keys[0]] - ref[keys[1]].astype(np.float64) @ ref[keys[0]]
    )
    assert np.linalg.norm(eff) == pytest.approx(5.0, rel=1e-4)


def test_a_x1e30_update_is_clipped_to_the_median_scale() -> None:
    ref = _lora(6, 5, 2)
    honest = [
        {k: v + 0.01 * RNG.normal(size=v.shape).astype(np.float32) for k, v in ref.items()} for _ in range(4)
    ]
    evil = {k: (ref[k] + 1e30 * (honest[0][k] - ref[k])).astype(np.float32) for k in ref}
    updates = [SiloUpdate(i, copy.deepcopy(s), 10) for i, s in enumerate([*honest, evil])]
    report = Defence(_settings(clip_relative=3.0, max_weight_share=0.5), ALPHA).apply(updates, [ref] * 5)
    after = module_grams([u.state for u in updates], [ref] * 5, ALPHA)["m"]
    norms = np.sqrt(np.diag(after))
    # The bound is 3 x the median of all five norms (the attacker's counts as the largest one).
    assert norms[4] == pytest.approx(3.0 * np.median([*norms[:4], np.inf]), rel=1e-6)
    assert report.scores[4].flagged and report.scores[4].clip_factor < 1e-20


# -- caps and anomaly scores ------------------------------------------------------------------
def test_weight_caps_by_hand() -> None:
    np.testing.assert_allclose(cap_weights([1e9, 10, 10], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(cap_weights([10, 30], 0.5), [0.5, 0.5])
    np.testing.assert_allclose(cap_weights([10, 30], 1.0), [0.25, 0.75])
    # 60 of 100 capped at 0.4; the other 0.6 split 20:10:10 -> 0.3, 0.15, 0.15.
    np.testing.assert_allclose(cap_weights([60, 20, 10, 10], 0.4), [0.4, 0.3, 0.15, 0.15])
    np.testing.assert_allclose(cap_weights([5], 0.5), [1.0])  # one silo: infeasible, all of it


def test_anomaly_scores_flag_only_the_outlier() -> None:
    base = RNG.normal(size=20)
    rows = [base + 0.1 * RNG.normal(size=20) for _ in range(4)] + [100 * base]
    d = np.stack(rows)
    norms, ratios, dist, cosines, flags = anomaly_scores(d @ d.T, threshold=3.0)
    assert flags.tolist() == [False, False, False, False, True]
    assert ratios[4] > 50 and dist[4] > 50 and max(dist[:4]) < 1
    # Two silos: nobody can be told apart, nobody is flagged.
    assert not anomaly_scores(d[[0, 4]] @ d[[0, 4]].T, 3.0, 0.0)[4].any()


def test_anomaly_scores_flag_a_sign_flip_by_direction_only() -> None:
    """A sign-flipped update has the honest norm and is at most 2 norms from any other, so norm and
    distance cannot see it at a threshold of 3; its cosine with the others' sum can."""
    rng = np.random.default_rng(11)  # its own: the module's RNG depends on which tests ran first
    base = rng.normal(size=40)
    honest = [base + 0.5 * rng.normal(size=40) for _ in range(4)]
    d = np.stack([*honest, -honest[0]])
    g = d @ d.T
    _, ratios, dist, cosines, flags = anomaly_scores(g, threshold=3.0, min_cosine=0.0)
    assert flags.tolist() == [False, False, False, False, True]
    assert ratios[4] < 3 and dist[4] < 3  # not what flagged it
    assert cosines[4] < -0.5 and min(cosines[:4]) > 0.5
    # The cosine is the one of the dense vectors, computed from the Gram matrix alone.
    others = d[:4].sum(axis=0)
    want = d[4] @ others / (np.linalg.norm(d[4]) * np.linalg.norm(others))
    assert cosines[4] == pytest.approx(want, rel=1e-9)
    # -1 turns the direction test off; the others still flag nothing here.
    assert not anomaly_scores(g, 3.0, -1.0)[4].any()
    # A zero update points nowhere: not flagged for its direction.
    z = np.stack([*honest, np.zeros(40)])
    assert not anomaly_scores(z @ z.T, 1e9, 0.0)[4][4]


def test_krum_on_lora_factors_drops_a_scaled_update() -> None:
    ref = _lora(6, 5, 2)
    honest = [
        {k: v + 0.05 * RNG.normal(size=v.shape).astype(np.float32) for k, v in ref.items()} for _ in range(4)
    ]
    evil = {k: (ref[k] + 100 * (honest[0][k] - ref[k])).astype(np.float32) for k in ref}
    updates = [SiloUpdate(i, copy.deepcopy(s), 10) for i, s in enumerate([*honest, evil])]
    Defence(_settings(aggregator="multi-krum"), ALPHA).apply(updates, [ref] * 5)
    assert [u.key_weights["m" + A_SUFFIX] > 0 for u in updates] == [True] * 4 + [False]


# -- configuration and metrics ---------------------------------------------------------------------
def test_defence_settings_are_validated() -> None:
    from silotune.config import ConfigError, parse_run_config

    cfg = parse_run_config({"strategy.aggregator": "multi-krum", "strategy.max-weight-share": 0.3})
    assert cfg.strategy.aggregator == "multi-krum" and cfg.strategy.max_weight_share == 0.3
    for key, bad in [
        ("strategy.aggregator", "krum2"),
        ("strategy.max-weight-share", 0.0),
        ("strategy.max-weight-share", 1.5),
        ("strategy.clip-norm", float("inf")),
        ("strategy.clip-norm", float("nan")),
        ("strategy.clip-relative", 0.5),
        ("strategy.min-answers", 0),
        ("strategy.anomaly-threshold", 1.0),
        ("strategy.anomaly-min-cosine", 1.5),
        ("strategy.anomaly-min-cosine", float("nan")),
        ("strategy.max-rank", 0),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_run_config({key: bad})
    with pytest.raises(ConfigError, match="strategy.max-rank"):
        parse_run_config({"peft.rank": 32, "strategy.max-rank": 16})


def test_pyproject_defaults_match_the_schema() -> None:
    import tomllib
    from pathlib import Path

    from silotune.config import RunConfig, flatten_run_config

    flat = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    defaults = flat["tool"]["flwr"]["app"]["config"]
    schema = flatten_run_config(RunConfig())
    for key in [k for k in schema if k.startswith("strategy.") and k.split(".")[1] in _DEFENCE_KEYS]:
        assert defaults[key] == schema[key], key


_DEFENCE_KEYS = {
    "aggregator",
    "max-weight-share",
    "min-answers",
    "clip-norm",
    "clip-relative",
    "max-byzantine",
    "consensus-tolerance",
    "anomaly-threshold",
    "anomaly-min-cosine",
    "anomaly-rounds",
    "max-rank",
}


def test_exporter_turns_defence_events_into_series() -> None:
    from monitoring.exporter import FederationState
    from silotune import metrics as m

    st = FederationState()
    st.apply({"kind": "update_rejected", "node_id": 3, "silo": "c", "code": "shape", "phase": "train"})
    st.apply(
        {
            "kind": "anomaly_score",
            "node_id": 3,
            "silo": "c",
            "distance": 40.0,
            "norm_ratio": None,
            "cosine": -0.75,
            "flagged": True,
            "streak": 2,
            "weight_share": 0.5,
            "clip_factor": 0.01,
        }
    )
    st.apply({"kind": "silo_excluded", "node_id": 3, "silo": "c"})
    st.apply({"kind": "quorum_missed", "round": 4})
    assert st.counters[m.UPDATES_REJECTED_BY_REASON.name] == {("c", "shape", "train"): 1.0}
    assert st.gauges[m.SILO_ANOMALY_DISTANCE.name] == {("c",): 40.0}
    assert st.gauges[m.SILO_UPDATE_COSINE.name] == {("c",): -0.75}
    assert m.SILO_NORM_RATIO.name not in st.gauges  # null (infinite) is not a measurement
    assert st.gauges[m.SILO_ANOMALY_FLAGGED.name] == {("c",): 1.0}
    assert st.counters[m.SILO_EXCLUSIONS.name] == {("c",): 1.0}
    assert st.counters[m.QUORUM_MISSED.name] == {(): 1.0}
