"""A scripted Flower Grid for driving the round loop without processes: silos answer at once.

Shared by the round-loop tests (tests/test_rounds.py, test_reply_checks.py, test_faults.py, ...);
the real-process versions are in tests/test_federation_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from silotune.adapters import from_array_record, to_array_record
from silotune.config import parse_run_config
from silotune.events import read_events
from silotune.wire_codec import decode, encode_uplink, encoding_in, payload_shapes
from superlink.app.rounds import Federation

SHA = "a" * 64
INIT = {"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}


class FakeSilo:
    def __init__(self, name: str, sha: str = SHA, n: int = 10, delta: float = 1.0) -> None:
        self.name, self.sha, self.n, self.delta = name, sha, n, delta
        self.bad_shape = False

    def reply(self, msg: Message) -> RecordDict:
        mtype = msg.metadata.message_type
        if mtype == "query":
            content = RecordDict(
                {
                    "info": ConfigRecord({"silo": self.name, "model-sha256": self.sha, "model-name": "m"}),
                    "metrics": MetricRecord({"lora-rank": 2, "num-examples": self.n, "num-eval-examples": 0}),
                }
            )
            if msg.content["config"]["want-init"]:
                content["arrays"] = to_array_record(INIT)
                content["info"]["peft-config"] = '{"r": 2, "peft_type": "LORA"}'
            return content
        # Like a real silo: decode what came in the run's wire format, answer in the same one.
        wire = from_array_record(msg.content["arrays"])
        enc = encoding_in(wire)
        state = decode(wire, enc, payload_shapes(wire))
        new = {k: v + self.delta for k, v in state.items()}
        if self.bad_shape:
            new["m.lora_A.weight"] = np.ones((3, 3), np.float32)
        return RecordDict(
            {
                "arrays": to_array_record(encode_uplink(new, state, enc)),
                "metrics": MetricRecord({"train-loss": 1.0, "num-examples": self.n}),
                "info": ConfigRecord({"silo": self.name, "model-sha256": self.sha}),
            }
        )


class FakeGrid:
    """Answers every pushed message at once; ``flaky`` pulls raise first (a busy SuperLink)."""

    def __init__(
        self,
        silos: dict[int, FakeSilo],
        flaky_pulls: int = 0,
        drop: Callable[[int], bool] = lambda nid: False,
    ) -> None:
        self.silos, self.flaky, self.drop = silos, flaky_pulls, drop
        self.outbox: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.silos)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, m in enumerate(messages):
            mid = f"{len(self.outbox)}-{i}"
            m.metadata.__dict__["_message_id"] = mid
            nid = m.metadata.dst_node_id
            if not self.drop(nid):
                out = self.silos[nid].reply(m)  # content, or a whole reply (an error reply)
                reply = out if isinstance(out, Message) else Message(out, reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = nid
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if self.flaky > 0:
            self.flaky -= 1
            raise RuntimeError("Server error '500 Internal Server Error' (database is locked)")
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def make_federation(tmp_path: Path, grid: FakeGrid, **cfg: object) -> Federation:
    base = {
        "num-rounds": 2,
        "strategy.min-nodes": 2,
        "strategy.round-timeout": 5.0,
        "strategy.wait-for-nodes": 1.0,
        "peft.rank": 2,
    }
    base.update(cfg)
    return Federation(grid, parse_run_config(base), tmp_path / "run", sleep=lambda s: None)


def events_of(tmp_path: Path, kind: str) -> list[dict]:
    return [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == kind]
