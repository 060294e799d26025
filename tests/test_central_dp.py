"""Central DP on the aggregate (superlink/app/defences/central_dp.py): clipping, noise, accounting,
the config section. Pure numpy, no Flower processes; only the accountant tests import Opacus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from silotune import protocol as p
from silotune.config import CentralDPSettings, ConfigError, RunConfig, flatten_run_config, parse_run_config
from superlink.app.defences.central_dp import (
    SAMPLE_RATE,
    CentralAccountant,
    add_noise,
    central_dp_aggregate,
    clip_update,
    release_as_update,
    round_refusal,
    secret_rng,
)
from superlink.app.strategies.base import weighted_average

DELTA = 1e-5


def _norm(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in d.values()))


def _adapter(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A small LoRA-shaped adapter (two modules, A and B) plus a lone vector, float32 as on the wire."""
    return {
        "m0.lora_A.weight": (scale * rng.standard_normal((4, 16))).astype(np.float32),
        "m0.lora_B.weight": (scale * rng.standard_normal((12, 4))).astype(np.float32),
        "m1.lora_A.weight": (scale * rng.standard_normal((4, 16))).astype(np.float32),
        "m1.lora_B.weight": (scale * rng.standard_normal((12, 4))).astype(np.float32),
        "m2.ia3_l": (scale * rng.standard_normal(7)).astype(np.float32),
    }


def _settings(**kw: float) -> CentralDPSettings:
    """Validated settings; noise 0 (which the config refuses) only through model_construct."""
    if kw.get("noise_multiplier", 1.0) == 0:
        return CentralDPSettings.model_construct(enabled=True, **kw)
    return CentralDPSettings(enabled=True, **kw)


# -- clipping ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 1e-6, 0.01, 0.3, 1.0, 50.0, 1e6])
def test_clipping_bound_holds_for_every_update(scale: float) -> None:
    rng = np.random.default_rng(7)
    bound = 0.5
    for _ in range(20):
        delta = _adapter(rng, scale)
        clipped, factor = clip_update(delta, bound)
        raw = _norm(delta)
        assert set(clipped) == set(delta)
        assert all(clipped[k].shape == delta[k].shape for k in delta)
        assert _norm(clipped) <= bound * (1 + 1e-12)
        if raw <= bound:  # under the bound: unchanged, factor 1 (a zero delta too)
            assert factor == 1.0
            assert all(np.array_equal(clipped[k], delta[k].astype(np.float64)) for k in delta)
        else:  # over it: the same direction, scaled to exactly the bound over ALL tensors together
            assert factor == pytest.approx(bound / raw, rel=1e-12)
            assert _norm(clipped) == pytest.approx(bound, rel=1e-9)
            for k in delta:
                np.testing.assert_allclose(clipped[k], delta[k].astype(np.float64) * factor, rtol=1e-12)


def test_clip_refuses_a_non_finite_update_and_a_bad_norm() -> None:
    with pytest.raises(ValueError, match="not finite"):
        clip_update({"a": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="clipping norm"):
        clip_update({"a": np.ones(3)}, 0.0)


def test_every_silos_contribution_is_clipped_relative_to_what_it_was_sent() -> None:
    """Through the entry point: one silo at a time (n=1, noise 0), its delta from ITS payload
    (a dequantized copy may differ from the global) is within C, and the report says who was clipped."""
    rng = np.random.default_rng(3)
    glob = _adapter(rng)
    bound = 0.2
    settings = _settings(noise_multiplier=0.0, clipping_norm=bound)
    updates, sent = [], []
    for scale in (0.001, 0.05, 1.0, 30.0):
        ref = {k: v + np.float32(1e-3) for k, v in glob.items()}  # what this silo was sent
        sent.append(ref)
        updates.append({k: v + _adapter(rng, scale)[k] for k, v in ref.items()})
    _, report = central_dp_aggregate(glob, updates, sent, settings, rng)
    assert report[p.CDP_NUM_CLIPPED] == sum(n > bound for n in report[p.CDP_UPDATE_NORM])
    for i, (upd, ref) in enumerate(zip(updates, sent, strict=True)):
        new, one = central_dp_aggregate(ref, [upd], [ref], settings, rng)
        moved = {k: new[k].astype(np.float64) - ref[k] for k in ref}
        assert _norm(moved) <= bound * (1 + 1e-5)  # float32 rounding of the new state
        raw = _norm({k: upd[k].astype(np.float64) - ref[k] for k in ref})
        assert one[p.CDP_UPDATE_NORM][0] == pytest.approx(raw)
        assert one[p.CDP_CLIP_FACTOR][0] == pytest.approx(min(1.0, bound / raw))
        assert report[p.CDP_CLIP_FACTOR][i] == pytest.approx(min(1.0, bound / raw))


# -- noise ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("z", "c", "n"), [(1.0, 1.0, 1), (1.1, 0.5, 4), (0.7, 2.0, 10)])
def test_noise_std_matches_z_c_over_n(z: float, c: float, n: int) -> None:
    rng = np.random.default_rng(1234)
    zero = {"a": np.zeros((64, 64)), "b": np.zeros(1000)}
    draws = np.concatenate(
        [np.concatenate([v.ravel() for v in add_noise(zero, z, c, n, rng).values()]) for _ in range(40)]
    )
    expected = z * c / n
    assert draws.size == 40 * (64 * 64 + 1000)
    assert abs(float(draws.mean())) < 5 * expected / math.sqrt(draws.size)
    assert float(draws.std()) == pytest.approx(expected, rel=0.01)


def test_noise_on_the_aggregate_is_z_c_over_the_silos_asked() -> None:
    """Silos that send back what they got: the global moves by the noise alone, std z·C/n, where n is
    the number asked (num_sampled), not the number that answered."""
    rng = np.random.default_rng(99)
    glob = {"w": np.zeros((300, 300), dtype=np.float32)}
    settings = _settings(noise_multiplier=1.3, clipping_norm=0.4)
    new, report = central_dp_aggregate(glob, [glob, glob], [glob, glob], settings, rng, num_sampled=5)
    assert report[p.CDP_NOISE_STD] == pytest.approx(1.3 * 0.4 / 5)
    assert report[p.CDP_NUM_SAMPLED] == 5 and report[p.CDP_NUM_UPDATES] == 2
    assert float(np.std(new["w"])) == pytest.approx(1.3 * 0.4 / 5, rel=0.02)
    assert new["w"].dtype == np.float32


def test_seeded_noise_is_reproducible_and_the_secret_rng_is_not() -> None:
    zero = {"a": np.zeros(50)}
    a = add_noise(zero, 1.0, 1.0, 2, np.random.default_rng(5))["a"]
    b = add_noise(zero, 1.0, 1.0, 2, np.random.default_rng(5))["a"]
    assert np.array_equal(a, b)
    assert not np.array_equal(add_noise(zero, 1.0, 1.0, 2, secret_rng())["a"], a)


# -- the aggregate ---------------------------------------------------------------------------------------
def test_noise_zero_and_a_huge_clip_give_the_plain_equal_weight_mean() -> None:
    rng = np.random.default_rng(11)
    glob = _adapter(rng)
    updates = [{k: v + _adapter(rng, s)[k] for k, v in glob.items()} for s in (0.1, 1.0, 3.0)]
    settings = _settings(noise_multiplier=0.0, clipping_norm=1e9)
    new, report = central_dp_aggregate(glob, updates, [glob] * 3, settings, rng)
    plain = weighted_average(updates, [1.0, 1.0, 1.0])
    assert list(new) == list(glob)
    for k in glob:
        np.testing.assert_allclose(new[k], plain[k], rtol=1e-6, atol=1e-6)
    assert report[p.CDP_NUM_CLIPPED] == 0 and report[p.CDP_NOISE_STD] == 0.0


def test_the_denominator_is_the_silos_asked_and_never_fewer_than_the_updates() -> None:
    """A silo asked but absent adds a zero delta (the add/remove neighbour): the mean shrinks."""
    rng = np.random.default_rng(2)
    glob = {"w": np.zeros(4, dtype=np.float32)}
    ups = [{"w": np.full(4, 1.0, dtype=np.float32)}, {"w": np.full(4, 3.0, dtype=np.float32)}]
    settings = _settings(noise_multiplier=0.0, clipping_norm=1e9)
    new, _ = central_dp_aggregate(glob, ups, [glob, glob], settings, rng, num_sampled=4)
    np.testing.assert_allclose(new["w"], np.full(4, 1.0))
    with pytest.raises(ValueError, match="num_sampled"):
        central_dp_aggregate(glob, ups, [glob, glob], settings, rng, num_sampled=1)


def test_mismatched_updates_are_refused_and_no_update_releases_nothing() -> None:
    rng = np.random.default_rng(0)
    glob = {"w": np.zeros(4, dtype=np.float32)}
    settings = _settings(noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(ValueError, match="shape"):
        central_dp_aggregate(glob, [{"w": np.zeros(5, np.float32)}], [glob], settings, rng)
    with pytest.raises(ValueError, match="tensors"):
        central_dp_aggregate(glob, [{"v": np.zeros(4, np.float32)}], [glob], settings, rng)
    with pytest.raises(ValueError, match="payloads"):
        central_dp_aggregate(glob, [glob], [], settings, rng)
    acc = CentralAccountant()
    new, report = central_dp_aggregate(glob, [], [], settings, rng, num_sampled=3, accountant=acc)
    assert np.array_equal(new["w"], glob["w"]) and report[p.CDP_NUM_UPDATES] == 0
    assert acc.rounds == 0  # nothing released, nothing charged


def test_the_release_feeds_a_server_optimizer_as_one_update() -> None:
    """Post-processing: FedAvg of the single released state is that state."""
    from silotune.config import PeftSettings, StrategySettings
    from superlink.app.strategies import get_strategy

    rng = np.random.default_rng(4)
    glob = _adapter(rng)
    released, _ = central_dp_aggregate(glob, [_adapter(rng)], [glob], _settings(), rng)
    out = get_strategy(StrategySettings(), PeftSettings()).aggregate(glob, [release_as_update(released)])
    for k in glob:
        np.testing.assert_array_equal(out[k], released[k])


# -- accounting ----------------------------------------------------------------------------------------
SCHEDULE = [(1.1, 1.0)] * 4 + [(0.8, 0.5)] * 3 + [(1.1, 1.0)] * 2


def test_accountant_equals_opacus_and_grows_with_rounds() -> None:
    from opacus.accountants import RDPAccountant

    ours, theirs = CentralAccountant(), RDPAccountant()
    assert ours.epsilon(DELTA) == 0.0
    last = 0.0
    for z, q in SCHEDULE:
        ours.step(z, q)
        theirs.step(noise_multiplier=z, sample_rate=q)
        eps = ours.epsilon(DELTA)
        assert eps == theirs.get_epsilon(delta=DELTA)
        assert eps > last
        last = eps
    assert ours.rounds == len(SCHEDULE)
    assert ours.history == [(1.1, 1.0, 4), (0.8, 0.5, 3), (1.1, 1.0, 2)]
    assert ours.epsilon(1e-3) < ours.epsilon(DELTA)  # a looser delta, a smaller epsilon


def test_accountant_dict_round_trip_keeps_the_spent_epsilon() -> None:
    acc = CentralAccountant()
    for z, q in SCHEDULE:
        acc.step(z, q)
    again = CentralAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert again.history == acc.history
    assert again.epsilon(DELTA) == acc.epsilon(DELTA)
    again.step(1.1, 1.0)  # a resumed run goes on from what it had spent
    acc.step(1.1, 1.0)
    assert again.epsilon(DELTA) == acc.epsilon(DELTA)
    assert CentralAccountant.from_dict(None).epsilon(DELTA) == 0.0
    assert CentralAccountant.from_dict({}).rounds == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 2, "mechanism": "rdp", "history": []},
        {"version": 1, "mechanism": "prv", "history": []},
        {"version": 1, "mechanism": "rdp", "history": [[1.0, 1.0]]},
        {"version": 1, "mechanism": "rdp", "history": [[0.0, 1.0, 1]]},
        {"version": 1, "mechanism": "rdp", "history": [[1.0, 1.5, 1]]},
        {"version": 1, "mechanism": "rdp", "history": [[1.0, 1.0, 0]]},
    ],
)
def test_a_malformed_accountant_state_is_refused_not_read_as_zero(bad: dict) -> None:
    with pytest.raises(ValueError):
        CentralAccountant.from_dict(bad)


def test_would_exceed_refuses_the_round_that_crosses_max_epsilon() -> None:
    z, q = 1.0, 1.0
    probe = CentralAccountant()
    eps = []
    for _ in range(4):
        probe.step(z, q)
        eps.append(probe.epsilon(DELTA))
    max_eps = (eps[2] + eps[3]) / 2  # room for exactly three rounds
    settings = _settings(noise_multiplier=z, clipping_norm=1.0, target_delta=DELTA, max_epsilon=max_eps)
    acc, ran = CentralAccountant(), 0
    while not acc.would_exceed(max_eps, DELTA, q, z):
        assert round_refusal(acc, settings, q) is None
        acc.step(z, q)
        ran += 1
        assert ran < 10
    assert ran == 3
    assert acc.epsilon(DELTA) <= max_eps < acc.epsilon_after(DELTA, q, z)
    reason = round_refusal(acc, settings, q)
    assert reason is not None and "central-dp.max-epsilon" in reason
    assert not acc.would_exceed(0.0, DELTA, q, z)  # 0: no limit
    assert acc.rounds == 3  # asking charges nothing


def test_the_entry_point_charges_its_accountant() -> None:
    rng = np.random.default_rng(8)
    glob = _adapter(rng)
    settings = _settings(noise_multiplier=1.2, clipping_norm=0.3, target_delta=DELTA)
    acc = CentralAccountant()
    for _ in range(2):
        glob, report = central_dp_aggregate(
            glob, [_adapter(rng), _adapter(rng)], [glob, glob], settings, rng, accountant=acc
        )
    assert acc.history == [(1.2, 1.0, 2)]
    assert report[p.CDP_EPSILON] == acc.epsilon(DELTA) and report[p.CDP_DELTA] == DELTA
    assert report[p.CDP_SAMPLE_RATE] == 1.0
    assert set(p.CDP_FIELDS) <= set(report) and set(p.CDP_SILO_FIELDS) <= set(report)


def test_a_run_charges_every_round_at_q_1_no_amplification() -> None:
    """SiloTune's silo sampling is seeded from train.seed, which the silos know: no subsampling bound."""
    assert SAMPLE_RATE == 1.0


# -- config --------------------------------------------------------------------------------------------
def test_central_dp_is_off_by_default_and_round_trips() -> None:
    import tomllib
    from pathlib import Path

    cfg = RunConfig()
    assert cfg.central_dp.enabled is False
    flat = flatten_run_config(cfg)
    keys = {k: v for k, v in flat.items() if k.startswith("central-dp.")}
    assert set(keys) == {
        "central-dp.enabled",
        "central-dp.noise-multiplier",
        "central-dp.clipping-norm",
        "central-dp.target-delta",
        "central-dp.max-epsilon",
    }
    on = parse_run_config({**flat, "central-dp.enabled": True, "central-dp.max-epsilon": 8.0})
    assert on.central_dp.enabled and on.central_dp.max_epsilon == 8.0
    assert parse_run_config(flatten_run_config(on)) == on
    # Flower refuses --run-config keys its app's defaults lack: pyproject lists them all, as the schema.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert {k: defaults[k] for k in keys} == keys


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("central-dp.noise-multiplier", 0.0),
        ("central-dp.noise-multiplier", -1.0),
        ("central-dp.noise-multiplier", float("nan")),
        ("central-dp.clipping-norm", 0.0),
        ("central-dp.clipping-norm", float("inf")),
        ("central-dp.target-delta", 0.0),
        ("central-dp.target-delta", 1.0),
        ("central-dp.max-epsilon", -1.0),
        ("central-dp.max-epsilon", float("inf")),
        ("central-dp.enabled", "maybe"),
        ("central-dp.epsilon", 3.0),
    ],
)
def test_bad_central_dp_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({"central-dp.enabled": True, key: value})
    assert key in str(err.value)


def test_central_dp_refuses_flexlora() -> None:
    with pytest.raises(ConfigError, match=r"central-dp\.enabled.*flexlora"):
        parse_run_config({"central-dp.enabled": True, "strategy.name": "flexlora"})
    assert parse_run_config({"central-dp.enabled": False, "strategy.name": "flexlora"})
