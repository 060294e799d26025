"""The protocol's one codec for adapter tensors on the wire: fp32, bf16, int8 or int4 (``transport.dtype``).

Both roles use it: the server encodes the downlink and decodes the uplink, a silo the reverse, so
an encoding can never be read differently at the two ends. Every format packs the whole adapter
into two or three arrays (fp32 too, unless ``transport.pack = false``), because Flower 1.41 moves
each array as its own objects, one HTTP request each through the SuperLink, the proxy and the
SuperNode's Runtime API: an adapter of 120 tensors cost about 18 s per direction per round on the
2-core machine (benchmarks/round_overhead.py), two arrays cost well under a second. The arrays:

- ``codec.meta``: uint8 JSON with the version, the format, the block size and every tensor's key and
  shape, in order;
- ``codec.data``: the values of all tensors, flattened in that order and concatenated. fp32 is the
  float32 values (little-endian) as they are; bf16 is the upper half of each float32 (round to
  nearest even, by torch). int8 and int4 are block-wise
  absmax quantization by bitsandbytes' own kernels: ``quantize_blockwise`` (8-bit dynamic map) and
  ``quantize_4bit`` (NF4, two values per byte);
- ``codec.scales``: float32, the absmax of every block (int8 and int4 only). The scales travel with
  their blocks.

An uplink in a quantized format carries the silo's *update* (trained minus received), not its
adapter, with error feedback (:class:`ErrorFeedback`): quantizing a small update loses far less than
quantizing the whole adapter, and the residual carried to the next round keeps the error from
accumulating. The server adds the decoded update to what it sent that silo, aggregates in float32,
and checkpoints in full precision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from silotune.atomic_files import atomic_write_bytes

if TYPE_CHECKING:
    from silotune.config import TransportSettings

TransportDtype = Literal["fp32", "bf16", "int8", "int4"]
TRANSPORT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
META_KEY, DATA_KEY, SCALES_KEY = "codec.meta", "codec.data", "codec.scales"
CODEC_VERSION = 1
# bitsandbytes' block sizes; the defaults keep int8 under 0.26x and int4 under 0.14x of fp32 bytes,
# scales included (int4 at 64 would be 0.1406x).
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCK = {"int8": 256, "int4": 128}


class CodecError(ValueError):
    """A payload that does not decode as the run's encoding (the message names what is wrong)."""


@dataclass(frozen=True)
class Encoding:
    """How adapters travel in a run: ``dtype`` and, for int8/int4, the quantization block size."""

    dtype: str = "fp32"
    block_size: int = 0  # 0: the format's default
    # fp32 only: False sends one float32 array per tensor (Flower's own layout, transport.pack=false).
    pack: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in TRANSPORT_DTYPES:
            raise CodecError(f"transport.dtype={self.dtype!r}: expected one of {', '.join(TRANSPORT_DTYPES)}")
        if self.block_size and self.block_size not in BLOCK_SIZES:
            raise CodecError(f"transport.block-size={self.block_size}: expected one of {BLOCK_SIZES}")

    @property
    def block(self) -> int:
        return self.block_size or DEFAULT_BLOCK.get(self.dtype, 0)

    @property
    def quantized(self) -> bool:
        """Lossy: the uplink is an update against what was received, with error feedback."""
        return self.dtype != "fp32"

    @property
    def packed(self) -> bool:
        """The adapter travels as ``codec.meta`` + ``codec.data`` (+ ``codec.scales``)."""
        return self.quantized or self.pack


def encoding_for(transport: TransportSettings) -> Encoding:
    """The run's wire format from its ``transport.*`` settings, the same at both ends."""
    return Encoding(transport.dtype, transport.block_size, transport.pack)


def float32_nbytes(state: dict[str, np.ndarray]) -> int:
    """What ``state`` weighs as plain float32 tensors, one array per tensor (Flower's own layout;
    ``ArrayRecord.count_bytes()``, headers and keys included): the fixed figure every format,
    packed fp32 included, is measured against."""
    from silotune.adapters import to_array_record

    return int(to_array_record(encode(state, Encoding("fp32", pack=False))).count_bytes())


def payload_nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of encoded arrays as Flower counts them (``ArrayRecord.count_bytes()``), like a
    deployment's ``uplink_bytes``/``downlink_bytes``."""
    from silotune.adapters import to_array_record

    return int(to_array_record(arrays).count_bytes())


def packed_sizes(n_values: int, enc: Encoding) -> tuple[int, int]:
    """(data bytes, number of scales) a payload of ``n_values`` must have: checked before decoding."""
    if enc.dtype == "fp32":
        return 4 * n_values, 0
    if enc.dtype == "bf16":
        return 2 * n_values, 0
    blocks = math.ceil(n_values / enc.block)
    if enc.dtype == "int8":
        return n_values, blocks
    return (n_values + 1) // 2, blocks  # int4


def _flatten(state: dict[str, np.ndarray]) -> np.ndarray:
    if not state:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(state[k], dtype=np.float32).ravel() for k in state])


def encode(state: dict[str, np.ndarray], enc: Encoding) -> dict[str, np.ndarray]:
    """``state`` (float32 tensors) in the run's wire format."""
    if not enc.packed:
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    import torch

    flat = torch.from_numpy(_flatten(state))
    meta = {
        "v": CODEC_VERSION,
        "dtype": enc.dtype,
        "block_size": enc.block,
        "tensors": [[k, list(np.shape(v))] for k, v in state.items()],
    }
    out = {META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()}
    if enc.dtype == "fp32":
        out[DATA_KEY] = flat.numpy().astype("<f4", copy=False).view(np.uint8).copy()
        return out
    if enc.dtype == "bf16":
        out[DATA_KEY] = flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).copy()
        return out
    import bitsandbytes.functional as bnbf

    if flat.numel() == 0:
        out[DATA_KEY], out[SCALES_KEY] = np.zeros(0, np.uint8), np.zeros(0, np.float32)
        return out
    if enc.dtype == "int8":
        q, qs = bnbf.quantize_blockwise(flat, blocksize=enc.block)
    else:
        q, qs = bnbf.quantize_4bit(flat, blocksize=enc.block, quant_type="nf4")
    out[DATA_KEY] = q.reshape(-1).numpy().copy()
    out[SCALES_KEY] = qs.absmax.to(torch.float32).numpy().copy()
    return out


def _read_meta(arrays: dict[str, np.ndarray]) -> dict:
    try:
        meta = json.loads(np.asarray(arrays[META_KEY], dtype=np.uint8).tobytes().decode())
        assert isinstance(meta, dict) and isinstance(meta["tensors"], list)
        return meta
    except (KeyError, ValueError, AssertionError, UnicodeDecodeError, TypeError) as exc:
        raise CodecError(f"malformed {META_KEY} ({type(exc).__name__})") from None


def encoding_of(arrays: dict[str, np.ndarray]) -> str:
    """The format a payload claims: 'fp32' for plain tensors, else what its metadata says (which
    may be 'fp32' too: packed fp32)."""
    if META_KEY not in arrays:
        return "fp32"
    return str(_read_meta(arrays).get("dtype", "?"))


def encoding_in(arrays: dict[str, np.ndarray]) -> Encoding:
    """The encoding a payload says it is in (for a reader that holds no run config)."""
    if META_KEY not in arrays:
        return Encoding("fp32", pack=False)
    meta = _read_meta(arrays)
    dtype = str(meta.get("dtype", "?"))
    return Encoding(dtype, int(meta.get("block_size", 0)) if dtype in DEFAULT_BLOCK else 0)


def payload_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The tensors and shapes a payload describes (its metadata, or its arrays when plain)."""
    if META_KEY not in arrays:
        return {k: tuple(np.shape(v)) for k, v in arrays.items()}
    try:
        return {str(k): tuple(int(d) for d in shape) for k, shape in _read_meta(arrays)["tensors"]}
    except (TypeError, ValueError):
        raise CodecError(f"malformed tensor list in {META_KEY}") from None


def decode(
    arrays: dict[str, np.ndarray], enc: Encoding, expected: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Float32 tensors from a payload in format ``enc`` that must hold exactly ``expected``.

    Everything is checked before anything is decoded: the format, the block size, the tensor keys,
    order and shapes, and the exact byte counts those imply. A mismatch raises :class:`CodecError`.
    """
    claimed = encoding_of(arrays)
    if claimed != enc.dtype:
        raise CodecError(f"payload is encoded as {claimed}, the run's transport.dtype is {enc.dtype}")
    if not enc.packed:
        if META_KEY in arrays:
            raise CodecError("a packed payload in a run whose transport.pack is false")
        return {k: np.asarray(v) for k, v in arrays.items()}
    allowed = {META_KEY, DATA_KEY} | ({SCALES_KEY} if enc.dtype in ("int8", "int4") else set())
    if set(arrays) != allowed:
        raise CodecError(f"payload arrays {sorted(arrays)}, expected {sorted(allowed)}")
    meta = _read_meta(arrays)
    if meta.get("v") != CODEC_VERSION or meta.get("block_size") != enc.block:
        raise CodecError(
            f"codec version {meta.get('v')} / block size {meta.get('block_size')}, "
            f"expected {CODEC_VERSION} / {enc.block}"
        )
    try:
        tensors = [(str(k), tuple(int(d) for d in shape)) for k, shape in meta["tensors"]]
    except (TypeError, ValueError):
        raise CodecError(f"malformed tensor list in {META_KEY}") from None
    if dict(tensors) != {k: tuple(s) for k, s in expected.items()} or len(tensors) != len(expected):
        raise CodecError("the payload's tensors or shapes differ from what was sent")
    n_values = sum(math.prod(s) for _, s in tensors)
    data_bytes, n_scales = packed_sizes(n_values, enc)
    data = np.asarray(arrays[DATA_KEY])
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != data_bytes:
        raise CodecError(f"{DATA_KEY} holds {data.size} {data.dtype} values, expected {data_bytes} uint8")
    flat = _unpack(data, arrays.get(SCALES_KEY), enc, n_values, n_scales)
    out, offset = {}, 0
    for key, shape in tensors:
        size = math.prod(shape)
        out[key] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out


def _unpack(
    data: np.ndarray, scales: np.ndarray | None, enc: Encoding, n_values: int, n_scales: int
) -> np.ndarray:
    import torch

    if enc.dtype == "fp32":
        return data.view("<f4").astype(np.float32)
    if enc.dtype == "bf16":
        bits = torch.from_numpy(data.copy().view(np.int16))
        return bits.view(torch.bfloat16).to(torch.float32).numpy()
    scales = np.asarray(scales)
    if scales.dtype != np.float32 or scales.ndim != 1 or scales.size != n_scales:
        raise CodecError(
            f"{SCALES_KEY} holds {scales.size} {scales.dtype} values, expected {n_scales} float32"
        )
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise CodecError(f"{SCALES_KEY} holds negative or non-finite block scales")
    if n_values == 0:
        return np.zeros(0, dtype=np.float32)
    import bitsandbytes.functional as bnbf

    absmax = torch.from_numpy(scales.copy())
    q = torch.from_numpy(data.copy())
    if enc.dtype == "int8":
        state = bnbf.QuantState(
            absmax=absmax, code=bnbf.create_dynamic_map(signed=True), blocksize=enc.block, dtype=torch.float32
        )
        return bnbf.dequantize_blockwise(q, state).numpy()
    state = bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size([n_values]),
        code=bnbf.get_4bit_type("nf4", device="cpu"),
        blocksize=enc.block,
        quant_type="nf4",
        dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(q.reshape(-1, 1), state).reshape(-1).numpy()


class ErrorFeedback:
    """A silo's quantization residual, carried from round to round (and across restarts, on disk).

    Each round the silo sends ``Q(update + residual)`` and keeps ``residual = (update + residual) -
    deQ(Q(update + residual))``: what quantization dropped this round is sent in a later one, so the
    sum of what was transmitted tracks the sum of the true updates instead of drifting from it.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.residual: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.exists():
            from safetensors.numpy import load_file

            try:
                self.residual = dict(load_file(str(self.path)))
            except Exception as exc:  # noqa: BLE001 - any unreadable file
                # The residual only refines later rounds; an unreadable one (a damaged disk, a
                # file from another version) must not cost this silo every round of the run.
                import logging

                logging.getLogger(__name__).warning(
                    "ignoring unreadable error-feedback residual %s (%s); starting from zero",
                    self.path,
                    type(exc).__name__,
                )

    def encode_update(self, update: dict[str, np.ndarray], enc: Encoding) -> dict[str, np.ndarray]:
        target = {
            k: v + self.residual[k] if k in self.residual and self.residual[k].shape == v.shape else v
            for k, v in update.items()
        }
        arrays = encode(target, enc)
        sent = decode(arrays, enc, {k: v.shape for k, v in target.items()})
        self.residual = {k: (target[k] - sent[k]).astype(np.float32) for k in target}
        self._save()
        return arrays

    def _save(self) -> None:
        if self.path is None:
            return
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in self.residual.items()})
        atomic_write_bytes(self.path, data, mode=0o600)  # the silo's own state: nobody else reads it


def encode_uplink(
    trained: dict[str, np.ndarray],
    received: dict[str, np.ndarray],
    enc: Encoding,
    feedback: ErrorFeedback | None = None,
) -> dict[str, np.ndarray]:
    """A silo's reply: its adapter (fp32), or its update against what it received (quantized)."""
    if not enc.quantized:
        return encode(trained, enc)
    update = {k: np.asarray(v, np.float32) - np.asarray(received[k], np.float32) for k, v in trained.items()}
    return feedback.encode_update(update, enc) if feedback is not None else encode(update, enc)


def decode_uplink(
    arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], enc: Encoding
) -> dict[str, np.ndarray]:
    """The silo's adapter as the server reconstructs it: ``sent`` plus the decoded update."""
    expected = {k: tuple(v.shape) for k, v in sent.items()}
    decoded = decode(arrays, enc, expected)
    if not enc.quantized:
        return decoded
    return {k: (np.asarray(sent[k], np.float32) + decoded[k]).astype(np.float32) for k in sent}
