"""The wire codec (silotune/wire_codec.py): error bounds per format, error feedback, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.wire_codec import (
    DATA_KEY,
    META_KEY,
    SCALES_KEY,
    CodecError,
    Encoding,
    ErrorFeedback,
    decode,
    decode_uplink,
    encode,
    encode_uplink,
    float32_nbytes,
    payload_nbytes,
)


def lora_like(seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    """An adapter's shapes: several LoRA pairs, rank 8, and an odd-sized tensor (padding paths)."""
    rng = np.random.default_rng(seed)
    state = {}
    for layer in range(3):
        for proj, (out, inp) in {"q_proj": (96, 96), "v_proj": (32, 96)}.items():
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = (rng.standard_normal((8, inp)) * scale).astype(np.float32)
            state[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, 8)) * scale / 4).astype(np.float32)
    state["odd.weight"] = rng.standard_normal(37).astype(np.float32)
    return state


def shapes(state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in state.items()}


def block_absmax(state: dict[str, np.ndarray], block: int) -> np.ndarray:
    """The absmax of each value's block, per value, in the codec's flattening order."""
    flat = np.concatenate([v.ravel() for v in state.values()])
    pad = (-flat.size) % block
    blocks = np.abs(np.pad(flat, (0, pad))).reshape(-1, block).max(axis=1)
    return np.repeat(blocks, block)[: flat.size]


def test_fp32_is_exact_packed_and_plain() -> None:
    state = lora_like()
    arrays = encode(state, Encoding("fp32"))
    assert set(arrays) == {META_KEY, DATA_KEY}  # two arrays, whatever the tensor count
    back = decode(arrays, Encoding("fp32"), shapes(state))
    assert all(np.array_equal(back[k], state[k]) and back[k].dtype == np.float32 for k in state)
    assert payload_nbytes(arrays) < float32_nbytes(state)  # one header, not one per tensor
    plain = encode(state, Encoding("fp32", pack=False))  # transport.pack=false: Flower's layout
    assert set(plain) == set(state) and payload_nbytes(plain) == float32_nbytes(state)
    back = decode(plain, Encoding("fp32", pack=False), shapes(state))
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_packed_and_plain_fp32_refuse_each_other() -> None:
    state = lora_like()
    with pytest.raises(CodecError, match="payload arrays"):
        decode(encode(state, Encoding("fp32", pack=False)), Encoding("fp32"), shapes(state))
    with pytest.raises(CodecError, match="transport.pack is false"):
        decode(encode(state, Encoding("fp32")), Encoding("fp32", pack=False), shapes(state))


def test_fp32_uplink_is_the_adapter_itself() -> None:
    received = lora_like(5)
    trained = {k: v * 1.5 for k, v in received.items()}
    enc = Encoding("fp32")
    rebuilt = decode_uplink(encode_uplink(trained, received, enc), received, enc)
    assert all(np.array_equal(rebuilt[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    ("dtype", "bound", "max_ratio"),
    [
        ("bf16", lambda x, _m: np.abs(x) * 2.0**-8 + 1e-30, 0.50),  # 8 mantissa bits, round to nearest
        ("int8", lambda _x, m: m / 64, 0.26),  # dynamic 8-bit map: the widest step is < 1/32 of absmax
        ("int4", lambda _x, m: m / 6, 0.14),  # NF4: the widest gap between levels is 0.28 of absmax
    ],
)
def test_round_trip_error_is_bounded_and_bytes_shrink(dtype: str, bound, max_ratio: float) -> None:  # noqa: ANN001
    state = lora_like(1)
    enc = Encoding(dtype)
    arrays = encode(state, enc)
    assert set(arrays) <= {META_KEY, DATA_KEY, SCALES_KEY}
    back = decode(arrays, enc, shapes(state))
    flat = np.concatenate([v.ravel() for v in state.values()])
    err = np.abs(np.concatenate([back[k].ravel() for k in state]) - flat)
    absmax = block_absmax(state, enc.block or 1)
    assert (err <= bound(flat, absmax)).all(), f"{dtype}: max error {err.max():g}"
    assert payload_nbytes(arrays) < float32_nbytes(state)


def smollm2_demo_adapter() -> dict[str, np.ndarray]:
    """The demo's adapter shapes: SmolLM2-135M, 30 layers, rank-8 LoRA on q_proj and v_proj."""
    rng = np.random.default_rng(7)
    state = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = (rng.standard_normal((8, 576)) * 0.02).astype(np.float32)
            state[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, 8)) * 0.005).astype(np.float32)
    return state


@pytest.mark.parametrize(("dtype", "max_ratio"), [("bf16", 0.50), ("int8", 0.26), ("int4", 0.14)])
def test_wire_bytes_against_fp32_on_the_demo_adapter(dtype: str, max_ratio: float) -> None:
    """What Flower counts (ArrayRecord.count_bytes: values, keys, headers), metadata and scales included."""
    from silotune.adapters import to_array_record

    state = smollm2_demo_adapter()
    fp32 = float32_nbytes(state)  # the fixed reference: one float32 array per tensor
    assert fp32 == to_array_record(encode(state, Encoding("fp32", pack=False))).count_bytes()
    packed = to_array_record(encode(state, Encoding(dtype))).count_bytes()
    assert packed <= max_ratio * fp32, f"{dtype}: {packed / fp32:.4f}x fp32"


def test_error_feedback_keeps_the_sum_of_transmitted_updates_on_the_sum_of_true_ones() -> None:
    rng = np.random.default_rng(3)
    enc = Encoding("int4")
    true_sum = {k: np.zeros_like(v) for k, v in lora_like().items()}
    fed_sum = {k: np.zeros_like(v) for k, v in true_sum.items()}
    plain_sum = {k: np.zeros_like(v) for k, v in true_sum.items()}
    feedback = ErrorFeedback()
    bias = {k: np.full(v.shape, 3e-4, np.float32) for k, v in true_sum.items()}  # a steady drift
    for _ in range(60):
        update = {
            k: (rng.standard_normal(v.shape) * 1e-3 + bias[k]).astype(np.float32) for k, v in true_sum.items()
        }
        sent = decode(feedback.encode_update(update, enc), enc, shapes(update))
        plain = decode(encode(update, enc), enc, shapes(update))
        for k in update:
            true_sum[k] += update[k]
            fed_sum[k] += sent[k]
            plain_sum[k] += plain[k]
    gap_fed = max(float(np.abs(fed_sum[k] - true_sum[k]).max()) for k in true_sum)
    gap_plain = max(float(np.abs(plain_sum[k] - true_sum[k]).max()) for k in true_sum)
    # With feedback the gap is one round's residual, bounded; without it, errors pile up.
    residual = max(float(np.abs(v).max()) for v in feedback.residual.values())
    assert gap_fed <= residual + 1e-6
    assert gap_fed < gap_plain / 3


def test_error_feedback_persists_across_a_restart(tmp_path) -> None:  # noqa: ANN001
    enc = Encoding("int8")
    path = tmp_path / "silo-state" / "residual.safetensors"
    first = ErrorFeedback(path)
    first.encode_update(lora_like(4, 1e-3), enc)
    again = ErrorFeedback(path)
    assert set(again.residual) == set(first.residual)
    assert all(np.array_equal(again.residual[k], first.residual[k]) for k in first.residual)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_uplink_carries_the_update_and_the_server_rebuilds_the_adapter(dtype: str) -> None:
    received = lora_like(5)
    trained = {k: v + 1e-3 * np.sign(v) for k, v in received.items()}
    enc = Encoding(dtype)
    rebuilt = decode_uplink(encode_uplink(trained, received, enc), received, enc)
    for k in trained:
        # The update is small: its quantization error is small against the adapter itself.
        np.testing.assert_allclose(rebuilt[k], trained[k], atol=2e-4)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda a: a.pop(SCALES_KEY), "payload arrays"),
        (lambda a: a.__setitem__(DATA_KEY, a[DATA_KEY][:-1]), "codec.data holds"),
        (lambda a: a.__setitem__(SCALES_KEY, a[SCALES_KEY] * np.float32("nan")), "non-finite block scales"),
        (lambda a: a.__setitem__(META_KEY, np.frombuffer(b"{not json", np.uint8)), "malformed codec.meta"),
        (lambda a: a.__setitem__("extra", np.zeros(1, np.float32)), "payload arrays"),
    ],
)
def test_a_tampered_payload_is_refused_before_decoding(tamper, message: str) -> None:  # noqa: ANN001
    state = lora_like()
    enc = Encoding("int8")
    arrays = encode(state, enc)
    tamper(arrays)
    with pytest.raises(CodecError, match=message):
        decode(arrays, enc, shapes(state))


def test_a_mismatched_encoding_is_refused() -> None:
    state = lora_like()
    with pytest.raises(CodecError, match="encoded as int8, the run's transport.dtype is int4"):
        decode(encode(state, Encoding("int8")), Encoding("int4"), shapes(state))
    with pytest.raises(CodecError, match="encoded as fp32, the run's transport.dtype is bf16"):
        decode(encode(state, Encoding("fp32")), Encoding("bf16"), shapes(state))
    with pytest.raises(CodecError, match="block size"):
        decode(encode(state, Encoding("int4", 64)), Encoding("int4", 128), shapes(state))
    wrong = dict(shapes(state))
    wrong["odd.weight"] = (38,)
    with pytest.raises(CodecError, match="tensors or shapes"):
        decode(encode(state, Encoding("bf16")), Encoding("bf16"), wrong)


def test_bad_settings_are_named() -> None:
    with pytest.raises(CodecError, match="transport.dtype='fp8'"):
        Encoding("fp8")
    with pytest.raises(CodecError, match="transport.block-size=100"):
        Encoding("int8", 100)


def test_an_unreadable_residual_costs_nothing_but_itself(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "residual.safetensors"
    path.write_bytes(b"not a safetensors file")
    feedback = ErrorFeedback(path)
    assert feedback.residual == {}
    update = lora_like(6, 1e-3)
    back = decode(feedback.encode_update(update, Encoding("int8")), Encoding("int8"), shapes(update))
    assert set(back) == set(update)
    assert ErrorFeedback(path).residual.keys() == update.keys()  # rewritten, readable again
