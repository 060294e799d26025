"""Every class of bad silo reply is rejected with its reason code, and the round goes on.

Driven through the real round loop (superlink/app/rounds.py) on the scripted grid of tests/test_rounds.py:
silos a and b are honest (both add 1 to every tensor), silo c sends the crafted reply. The run must
complete, c's reply must be refused with the expected code, and the global adapter must be what
a and b alone make of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from silotune import protocol as p
from silotune.adapters import to_array_record
from silotune.wire_codec import DATA_KEY, META_KEY, Encoding, decode, payload_shapes
from superlink.app.reply_checks import ReplyRejected, check_eval_reply, check_handshake
from tests.support.scripted_grid import INIT, FakeGrid, FakeSilo
from tests.support.scripted_grid import events_of as _kinds
from tests.support.scripted_grid import make_federation as _fed

pytestmark = pytest.mark.usefixtures("flower_task_identity")

Mutator = Callable[[RecordDict], None]


class EvilSilo(FakeSilo):
    """A FakeSilo whose replies of one phase (query / train / evaluate) pass through ``mutate``."""

    def __init__(self, name: str, phase: str, mutate: Mutator, n: int = 10, n_eval: int = 0) -> None:
        super().__init__(name, n=n)
        self.phase, self.mutate, self.n_eval = phase, mutate, n_eval

    def reply(self, msg: Message) -> RecordDict:
        mtype = msg.metadata.message_type
        if mtype == "evaluate":
            content = RecordDict({"metrics": MetricRecord({"num-examples": self.n_eval, "eval-loss": 0.5})})
        else:
            content = super().reply(msg)
            if mtype == "query":
                content["metrics"][p.NUM_EVAL_EXAMPLES] = self.n_eval
        if mtype == self.phase and not (mtype == "query" and msg.content["config"]["want-init"]):
            self.mutate(content)
        return content


def _set_metric(key: str, value: object) -> Mutator:
    def f(c: RecordDict) -> None:
        c["metrics"][key] = value

    return f


def _drop_metric(key: str) -> Mutator:
    def f(c: RecordDict) -> None:
        del c["metrics"][key]

    return f


def _arrays(edit: Callable[[dict[str, np.ndarray]], None]) -> Mutator:
    def f(c: RecordDict) -> None:
        state = {k: c["arrays"][k].numpy() for k in c["arrays"].keys()}
        edit(state)
        c["arrays"] = to_array_record(state)

    return f


def _float64(c: RecordDict) -> None:
    rec = ArrayRecord()
    for k in c["arrays"].keys():
        rec[k] = Array(c["arrays"][k].numpy().astype(np.float64))
    c["arrays"] = rec


def _oversized(c: RecordDict) -> None:
    key = "m.lora_A.weight"
    rec = c["arrays"]
    rec[key] = Array(dtype="float32", shape=tuple(rec[key].shape), stype="numpy.ndarray", data=b"\0" * 10**6)


def _nan_tensor(c: RecordDict) -> None:
    _arrays(lambda s: s["m.lora_B.weight"].__setitem__((0, 0), np.nan))(c)


def _metrics_as_config(c: RecordDict) -> None:
    c["metrics"] = ConfigRecord({"num-examples": "10", "train-loss": "1.0"})


TRAIN_CASES = [
    ("missing num-examples", _drop_metric(p.NUM_EXAMPLES), p.R_MISSING_KEY),
    ("missing train-loss", _drop_metric(p.TRAIN_LOSS), p.R_MISSING_KEY),
    ("missing metrics record", lambda c: c.__delitem__("metrics"), p.R_MISSING_RECORD),
    ("metrics as strings", _metrics_as_config, p.R_MISSING_RECORD),
    ("wrong type: list", _set_metric(p.NUM_EXAMPLES, [1, 2]), p.R_WRONG_TYPE),
    ("wrong type: fraction", _set_metric(p.NUM_EXAMPLES, 2.5), p.R_WRONG_TYPE),
    ("NaN examples", _set_metric(p.NUM_EXAMPLES, float("nan")), p.R_NOT_FINITE),
    ("Inf examples", _set_metric(p.NUM_EXAMPLES, float("inf")), p.R_NOT_FINITE),
    ("-0 examples", _set_metric(p.NUM_EXAMPLES, -0.0), p.R_OUT_OF_RANGE),
    ("zero examples", _set_metric(p.NUM_EXAMPLES, 0), p.R_OUT_OF_RANGE),
    ("negative examples", _set_metric(p.NUM_EXAMPLES, -5), p.R_OUT_OF_RANGE),
    ("1e9 examples (grew)", _set_metric(p.NUM_EXAMPLES, 10**9), p.R_EXAMPLES_GREW),
    ("NaN loss", _set_metric(p.TRAIN_LOSS, float("nan")), p.R_NOT_FINITE),
    ("negative loss", _set_metric(p.TRAIN_LOSS, -1.0), p.R_OUT_OF_RANGE),
    ("bad optional metric", _set_metric(p.TOKENS, float("inf")), p.R_NOT_FINITE),
    ("rank changed", _set_metric(p.LORA_RANK, 3), p.R_RANK),
    ("extra tensor", _arrays(lambda s: s.__setitem__("x.bias", np.zeros(2, np.float32))), p.R_TENSOR_SET),
    ("missing tensor", _arrays(lambda s: s.pop("m.lora_B.weight")), p.R_TENSOR_SET),
    (
        "wrong shape",
        _arrays(lambda s: s.__setitem__("m.lora_A.weight", np.ones((3, 3), np.float32))),
        p.R_SHAPE,
    ),
    ("wrong dtype", _float64, p.R_DTYPE),
    ("oversized", _oversized, p.R_OVERSIZED),
    ("NaN in a tensor", _nan_tensor, p.R_TENSOR_VALUES),
    ("other base model", lambda c: c["info"].__setitem__(p.MODEL_SHA256, "b" * 64), p.R_MODEL),
    ("no arrays", lambda c: c.__delitem__("arrays"), p.R_MISSING_RECORD),
]


# Per-tensor cases: the layout of transport.pack=false (one array per tensor). The packed layout's
# own cases (tensor list, shapes, byte counts) are refused by the codec: PACKED_CASES below.
PLAIN_LAYOUT = {
    "extra tensor",
    "missing tensor",
    "wrong shape",
    "wrong dtype",
    "oversized",
    "NaN in a tensor",
}


@pytest.mark.parametrize("name,mutate,code", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_reply_is_rejected_and_the_round_goes_on(
    tmp_path: Path, name: str, mutate: Mutator, code: str
) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: EvilSilo("c", "train", mutate)}
    layout = {"transport.pack": False} if name in PLAIN_LAYOUT else {}
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1, **layout})
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert [(e["node_id"], e["code"], e["phase"]) for e in rejected] == [(3, code, "train")]
    end = _kinds(tmp_path, "round_end")[0]
    assert end["answered"] == 2 and end["adapter_updated"]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 2.0)  # a and b: 1 + 1
    assert _kinds(tmp_path, "run_end")[0]["status"] == "completed"


def _packed(edit: Callable[[dict[str, np.ndarray]], None]) -> Mutator:
    """Edit the packed fp32 payload's arrays (codec.meta, codec.data) as they travel."""

    def f(c: RecordDict) -> None:
        arrays = {k: c["arrays"][k].numpy() for k in c["arrays"].keys()}
        edit(arrays)
        c["arrays"] = to_array_record(arrays)

    return f


def _as_plain(c: RecordDict) -> None:
    arrays = {k: c["arrays"][k].numpy() for k in c["arrays"].keys()}
    c["arrays"] = to_array_record(decode(arrays, Encoding("fp32"), payload_shapes(arrays)))


def _meta_shape(arrays: dict[str, np.ndarray]) -> None:
    meta = json.loads(arrays[META_KEY].tobytes())
    meta["tensors"][0][1] = [3, 3]
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()


def _packed_nan(arrays: dict[str, np.ndarray]) -> None:
    values = arrays[DATA_KEY].view("<f4").copy()
    values[0] = np.nan
    arrays[DATA_KEY] = values.view(np.uint8)


PACKED_CASES = [
    ("plain arrays", _as_plain, p.R_ENCODING),  # one array per tensor, in a packed run
    ("tensor shape in metadata", _packed(_meta_shape), p.R_ENCODING),
    ("short data", _packed(lambda a: a.__setitem__(DATA_KEY, a[DATA_KEY][:-4].copy())), p.R_ENCODING),
    ("oversized data", _packed(lambda a: a.__setitem__(DATA_KEY, np.zeros(10**6, np.uint8))), p.R_OVERSIZED),
    ("NaN in the values", _packed(_packed_nan), p.R_TENSOR_VALUES),
]


@pytest.mark.parametrize("mutate,code", [c[1:] for c in PACKED_CASES], ids=[c[0] for c in PACKED_CASES])
def test_bad_packed_fp32_reply_is_rejected_and_the_round_goes_on(
    tmp_path: Path, mutate: Mutator, code: str
) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: EvilSilo("c", "train", mutate)}
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1})  # fp32, packed: the default
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert [(e["node_id"], e["code"], e["phase"]) for e in rejected] == [(3, code, "train")]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 2.0)  # a and b: 1 + 1


HANDSHAKE_CASES = [
    ("rank 10^6", _set_metric(p.LORA_RANK, 10**6), p.R_RANK),
    ("rank 0", _set_metric(p.LORA_RANK, 0), p.R_RANK),
    ("no lora-rank", _drop_metric(p.LORA_RANK), p.R_MISSING_KEY),
    ("inf examples", _set_metric(p.NUM_EXAMPLES, float("inf")), p.R_NOT_FINITE),
    ("negative eval examples", _set_metric(p.NUM_EVAL_EXAMPLES, -1), p.R_OUT_OF_RANGE),
    ("no info", lambda c: c.__delitem__("info"), p.R_MISSING_RECORD),
    ("sha not hex", lambda c: c["info"].__setitem__(p.MODEL_SHA256, "zz"), p.R_OUT_OF_RANGE),
    ("name not a string", lambda c: c["info"].__setitem__(p.SILO, 7), p.R_WRONG_TYPE),
]


@pytest.mark.parametrize("mutate,code", [c[1:] for c in HANDSHAKE_CASES], ids=[c[0] for c in HANDSHAKE_CASES])
def test_bad_handshake_is_rejected_and_the_run_goes_on(tmp_path: Path, mutate: Mutator, code: str) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: EvilSilo("c", "query", mutate)}
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert rejected and {(e["node_id"], e["code"], e["phase"]) for e in rejected} == {(3, code, "handshake")}
    assert 3 not in fed.silos and _kinds(tmp_path, "round_start")[0]["sampled"] == [1, 2]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 2.0)


def test_a_silo_on_another_base_model_is_refused_for_the_run_like_any_bad_reply(tmp_path: Path) -> None:
    """A well-formed handshake from a silo whose base model is not the federation's (most silos'):
    refused for the run, reported as every other bad reply is (one update_rejected, round 0)."""
    other = lambda c: c["info"].__setitem__(p.MODEL_SHA256, "b" * 64)  # noqa: E731
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: EvilSilo("c", "query", other)}
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 2})
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert [(e["round"], e["node_id"], e["code"], e["phase"]) for e in rejected] == [
        (0, 3, p.R_MODEL, "handshake")
    ]
    assert "differs from the federation's" in rejected[0]["reason"] and fed.silos[3].refused
    assert [e["sampled"] for e in _kinds(tmp_path, "round_start")] == [[1, 2], [1, 2]]
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 3.0)  # 1 + 1 + 1: a and b, twice


@pytest.mark.parametrize(
    "mutate,code",
    [
        (_set_metric(p.NUM_EXAMPLES, 0), p.R_OUT_OF_RANGE),  # the ZeroDivisionError of issue 14
        (_set_metric(p.NUM_EXAMPLES, 500), p.R_EXAMPLES_GREW),
        (_set_metric(p.EVAL_LOSS, float("nan")), p.R_NOT_FINITE),
        (_drop_metric(p.EVAL_LOSS), p.R_MISSING_KEY),
    ],
    ids=["zero examples", "more than declared", "NaN loss", "no loss"],
)
def test_bad_evaluation_reply_is_rejected(tmp_path: Path, mutate: Mutator, code: str) -> None:
    silos = {
        1: EvilSilo("a", "none", lambda c: None, n_eval=4),
        2: FakeSilo("b"),
        3: EvilSilo("c", "evaluate", mutate, n_eval=4),
    }
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    fed.run()
    rejected = _kinds(tmp_path, "update_rejected")
    assert [(e["node_id"], e["code"], e["phase"]) for e in rejected] == [(3, code, "evaluate")]
    evals = _kinds(tmp_path, "evaluation")
    assert evals[0]["metrics"] == {"eval_loss": 0.5, "examples": 4}  # silo a's alone


def test_declared_examples_are_capped_at_the_max_weight_share(tmp_path: Path) -> None:
    # c declares 10^9 examples at its handshake (allowed) and moves every value by 10; a and b by 1.
    silos = {1: FakeSilo("a"), 2: FakeSilo("b"), 3: FakeSilo("c", n=10**9, delta=10.0)}
    # The caps alone: `mean` keeps c (consensus, the default, would drop it) and nothing is clipped.
    cfg = {"num-rounds": 1, "strategy.clip-relative": 0.0, "strategy.aggregator": "mean"}
    fed = _fed(tmp_path, FakeGrid(silos), **cfg)
    fed.run()
    # Shares 0.5 / 0.25 / 0.25 (capped), not 1e9 : 10 : 10: A = 1 + 0.5*10 + 0.25 + 0.25 = 6.5.
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], 6.5, rtol=1e-6)
    shares = {e["node_id"]: e["weight_share"] for e in _kinds(tmp_path, "anomaly_score")}
    assert shares == {1: 0.25, 2: 0.25, 3: 0.5}


def test_quorum_missed_leaves_the_adapter_unchanged(tmp_path: Path) -> None:
    silos = {1: FakeSilo("a"), 2: FakeSilo("b")}
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1, "strategy.min-answers": 3})
    fed.run()
    np.testing.assert_allclose(fed.global_state["m.lora_A.weight"], INIT["m.lora_A.weight"])
    end = _kinds(tmp_path, "round_end")[0]
    assert end["quorum_met"] is False and end["adapter_updated"] is False and not end["checkpoint"]
    missed = _kinds(tmp_path, "quorum_missed")
    assert missed[0]["valid_updates"] == 2 and missed[0]["min_answers"] == 3


def test_a_silo_flagged_k_rounds_running_is_excluded(tmp_path: Path) -> None:
    silos = {i: FakeSilo(n) for i, n in enumerate("abc", start=1)}
    silos[4] = FakeSilo("evil", delta=100.0)
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 3, "strategy.anomaly-rounds": 2})
    fed.run()
    scores = _kinds(tmp_path, "anomaly_score")
    assert {e["node_id"] for e in scores if e["flagged"]} == {4}
    excluded = _kinds(tmp_path, "silo_excluded")
    assert [(e["round"], e["node_id"], e["code"]) for e in excluded] == [(2, 4, p.R_ANOMALY_EXCLUDED)]
    assert 4 not in _kinds(tmp_path, "round_start")[2]["sampled"]
    assert "consecutive rounds" in fed.silos[4].refused


def test_x1e30_update_cannot_move_the_global_adapter_far(tmp_path: Path) -> None:
    silos = {i: FakeSilo(n) for i, n in enumerate("abc", start=1)}
    silos[4] = FakeSilo("evil", delta=1e30)
    fed = _fed(tmp_path, FakeGrid(silos), **{"num-rounds": 1})
    fed.run()
    assert np.isfinite(fed.global_state["m.lora_A.weight"]).all()
    assert np.abs(fed.global_state["m.lora_A.weight"]).max() < 10  # honest: 2; unclipped: 2.5e29


def test_checks_directly() -> None:
    good = RecordDict(
        {
            "info": ConfigRecord({"silo": "a", "model-sha256": "a" * 64}),
            "metrics": MetricRecord({"lora-rank": 4, "num-examples": 10, "num-eval-examples": 0}),
        }
    )
    assert check_handshake(good, max_rank=8).rank == 4
    with pytest.raises(ReplyRejected) as err:
        check_handshake(good, max_rank=2)
    assert err.value.code == p.R_RANK
    with pytest.raises(ReplyRejected) as err:
        check_eval_reply(RecordDict({"metrics": MetricRecord({"num-examples": 0, "eval-loss": 1.0})}), 5)
    assert err.value.code == p.R_OUT_OF_RANGE


def test_a_packed_initial_adapter_is_checked_by_its_own_tensor_list() -> None:
    from silotune.wire_codec import encode
    from superlink.app.reply_checks import check_init_reply

    def content(arrays: dict[str, np.ndarray]) -> RecordDict:
        info = ConfigRecord({p.PEFT_CONFIG: '{"r": 2, "peft_type": "LORA"}'})
        return RecordDict({"arrays": to_array_record(arrays), "info": info})

    packed = encode(INIT, Encoding("fp32"))
    state, cfg = check_init_reply(content(packed))
    assert cfg["r"] == 2 and all(np.array_equal(state[k], INIT[k]) for k in INIT)
    short = {**packed, DATA_KEY: packed[DATA_KEY][:-4].copy()}
    with pytest.raises(ReplyRejected) as err:
        check_init_reply(content(short))
    assert err.value.code == p.R_ENCODING
    values = packed[DATA_KEY].view("<f4").copy()
    values[1] = np.inf
    with pytest.raises(ReplyRejected) as err:
        check_init_reply(content({**packed, DATA_KEY: values.view(np.uint8)}))
    assert err.value.code == p.R_TENSOR_VALUES
