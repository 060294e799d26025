"""Each strategy's arithmetic against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.adapters import A_SUFFIX, B_SUFFIX
from silotune.config import PeftSettings, StrategySettings
from superlink.app.strategies import REGISTRY, SiloUpdate, get_strategy
from superlink.app.strategies.flexlora import FlexLoRA, svd_of_product


def _s(**kw: object) -> StrategySettings:
    return StrategySettings(**kw)


def _u(nid: int, w: list[float], n: int) -> SiloUpdate:
    return SiloUpdate(nid, {"w": np.array(w, dtype=np.float32)}, n)


GLOBAL = {"w": np.array([1.0, 2.0], dtype=np.float32)}
UPDATES = [_u(1, [2.0, 4.0], 1), _u(2, [5.0, 1.0], 3)]  # weights 1/4 and 3/4
# FedAvg by hand: 0.25*[2,4] + 0.75*[5,1] = [0.5+3.75, 1+0.75] = [4.25, 1.75]
AVG = np.array([4.25, 1.75])


def test_registry_has_every_strategy_by_name() -> None:
    assert sorted(REGISTRY) == ["fedadam", "fedavg", "fedavgm", "fedprox", "flexlora"]
    with pytest.raises(ValueError, match="strategy.name"):
        get_strategy(StrategySettings.model_construct(name="nope"), PeftSettings())


def test_fedavg_weights_by_examples() -> None:
    out = get_strategy(_s(name="fedavg"), PeftSettings()).aggregate(GLOBAL, UPDATES)
    np.testing.assert_allclose(out["w"], AVG, rtol=1e-6)


def test_fedprox_with_mu_zero_equals_fedavg_and_sends_its_mu() -> None:
    prox = get_strategy(_s(name="fedprox", proximal_mu=0.0), PeftSettings())
    avg = get_strategy(_s(name="fedavg"), PeftSettings())
    np.testing.assert_array_equal(prox.aggregate(GLOBAL, UPDATES)["w"], avg.aggregate(GLOBAL, UPDATES)["w"])
    assert prox.silo_config() == {"proximal-mu": 0.0}
    assert get_strategy(_s(name="fedprox", proximal_mu=0.5), PeftSettings()).silo_config() == {
        "proximal-mu": 0.5
    }


def test_fedavgm_matches_hand_computation_over_two_rounds() -> None:
    st = get_strategy(_s(name="fedavgm", server_lr=0.5, server_momentum=0.9), PeftSettings())
    # Round 1: pseudo-grad g1 = x - avg = [1-4.25, 2-1.75] = [-3.25, 0.25]; v1 = g1;
    # x1 = x - 0.5*v1 = [1+1.625, 2-0.125] = [2.625, 1.875]
    x1 = st.aggregate(GLOBAL, UPDATES)
    np.testing.assert_allclose(x1["w"], [2.625, 1.875], rtol=1e-6)
    # Round 2 (same updates): g2 = x1 - avg = [-1.625, 0.125]; v2 = 0.9*v1 + g2 = [-4.55, 0.35];
    # x2 = x1 - 0.5*v2 = [2.625+2.275, 1.875-0.175] = [4.9, 1.7]
    x2 = st.aggregate(x1, UPDATES)
    np.testing.assert_allclose(x2["w"], [4.9, 1.7], rtol=1e-6)


def test_fedavgm_state_round_trips_through_a_checkpoint() -> None:
    a = get_strategy(_s(name="fedavgm", server_lr=0.5), PeftSettings())
    x1 = a.aggregate(GLOBAL, UPDATES)
    b = get_strategy(_s(name="fedavgm", server_lr=0.5), PeftSettings())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.aggregate(x1, UPDATES)["w"], b.aggregate(x1, UPDATES)["w"])


def test_fedadam_matches_hand_computation() -> None:
    st = get_strategy(_s(name="fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001), PeftSettings())
    # delta = avg - x = [3.25, -0.25]; m = 0.1*delta = [0.325, -0.025];
    # v = 0.01*delta^2 = [0.105625, 0.000625]; sqrt(v) = [0.325, 0.025]
    # x1 = x + 0.1 * m / (sqrt(v) + 0.001) = [1 + 0.1*0.325/0.326, 2 - 0.1*0.025/0.026]
    x1 = st.aggregate(GLOBAL, UPDATES)
    np.testing.assert_allclose(x1["w"], [1 + 0.1 * 0.325 / 0.326, 2 - 0.1 * 0.025 / 0.026], rtol=1e-6)


def _lora_update(nid: int, b: np.ndarray, a: np.ndarray, n: int) -> SiloUpdate:
    return SiloUpdate(
        nid, {"m" + A_SUFFIX: a.astype(np.float32), "m" + B_SUFFIX: b.astype(np.float32)}, n, rank=a.shape[0]
    )


def test_flexlora_redistribution_reproduces_the_average_when_ranks_suffice() -> None:
    rng = np.random.default_rng(0)
    out_dim, in_dim, alpha = 12, 10, 16.0
    # The average of the silos' updates has rank 2 (built from a shared rank-2 basis).
    basis_b, basis_a = rng.normal(size=(out_dim, 2)), rng.normal(size=(2, in_dim))
    ranks, ns = [2, 3, 5], [10, 30, 60]
    updates = []
    for i, (r, n) in enumerate(zip(ranks, ns, strict=True)):
        coef = rng.normal(size=(2, 2))
        b = np.hstack([basis_b @ coef, np.zeros((out_dim, r - 2))])  # extra columns unused
        a = np.vstack([basis_a, rng.normal(size=(r - 2, in_dim))])
        updates.append(_lora_update(i, b, a, n))
    peft = PeftSettings(rank=4, alpha=alpha)
    st = FlexLoRA(_s(name="flexlora"), peft)
    w = np.array(ns) / sum(ns)
    expected = sum(
        wi
        * (alpha / r)
        * u.state["m" + B_SUFFIX].astype(np.float64)
        @ u.state["m" + A_SUFFIX].astype(np.float64)
        for wi, r, u in zip(w, ranks, updates, strict=True)
    )
    assert np.linalg.matrix_rank(expected, tol=1e-8) == 2
    global_state = st.aggregate({}, updates)
    assert global_state["m" + A_SUFFIX].shape == (5, in_dim)  # stored at the largest rank
    for r in ranks:
        payload = st.payload_for(global_state, r, server_round=2)
        b, a = payload["m" + B_SUFFIX], payload["m" + A_SUFFIX]
        assert b.shape == (out_dim, r) and a.shape == (r, in_dim)
        np.testing.assert_allclose((alpha / r) * b.astype(np.float64) @ a, expected, atol=1e-4)


def test_flexlora_truncates_to_the_best_low_rank_approximation() -> None:
    rng = np.random.default_rng(1)
    updates = [_lora_update(i, rng.normal(size=(8, 4)), rng.normal(size=(4, 6)), 1) for i in range(2)]
    peft = PeftSettings(rank=4, alpha=4.0)  # scale alpha/r = 1 at rank 4
    st = FlexLoRA(_s(name="flexlora"), peft)
    g = st.aggregate({}, updates)
    full = sum(0.5 * u.state["m" + B_SUFFIX].astype(np.float64) @ u.state["m" + A_SUFFIX] for u in updates)
    u, s, vt = np.linalg.svd(full)
    best2 = (u[:, :2] * s[:2]) @ vt[:2]
    p = st.payload_for(g, 2, 1)
    np.testing.assert_allclose(
        (4.0 / 2) * p["m" + B_SUFFIX].astype(np.float64) @ p["m" + A_SUFFIX], best2, atol=1e-4
    )


def test_flexlora_pads_small_global_ranks_with_trainable_rows() -> None:
    # Round 1: the initial adapter has B = 0; a larger silo must still get non-zero A rows to learn.
    st = FlexLoRA(_s(name="flexlora"), PeftSettings(rank=2, alpha=4.0))
    init = {"m" + A_SUFFIX: np.ones((2, 6), np.float32), "m" + B_SUFFIX: np.zeros((5, 2), np.float32)}
    p = st.payload_for(init, 4, 1)
    assert p["m" + A_SUFFIX].shape == (4, 6) and p["m" + B_SUFFIX].shape == (5, 4)
    assert np.all(np.abs(p["m" + A_SUFFIX]).sum(axis=1) > 0)
    np.testing.assert_array_equal(p["m" + B_SUFFIX], 0)


def test_svd_of_product_matches_dense_svd() -> None:
    rng = np.random.default_rng(2)
    b, a = rng.normal(size=(9, 3)), rng.normal(size=(3, 7))
    u, s, vt = svd_of_product(b, a)
    np.testing.assert_allclose((u * s) @ vt, b @ a, atol=1e-10)
    np.testing.assert_allclose(s[:3], np.linalg.svd(b @ a, compute_uv=False)[:3], rtol=1e-10)
