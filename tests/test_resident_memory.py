"""The resident worker's caches, in-process: the model loads once, changed data is re-read, and the
process's memory does not grow across rounds (RSS after round 20 <= 1.05 x RSS after round 2)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.support.tiny_model import make_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture()
def resident_mode():
    from silo_node.app import resident

    resident.RESIDENT = True
    resident.release_model()
    resident.counters.model_loads = resident.counters.data_loads = resident.counters.encodes = 0
    yield resident
    resident.RESIDENT = False
    resident.release_model()


def _data(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            label = rng.choice(["positive", "negative"])
            fh.write(json.dumps({"text": f"Company {i} shares {'rose' if label == 'positive' else 'fell'}",
                                 "label": label}) + "\n")  # fmt: skip
    return path


def _message_and_context(model: Path, data: Path, server_round: int, arrays):  # noqa: ANN001, ANN202
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # What pull_task_input sets in a ClientApp process; a Message needs it in Flower 1.41.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    run_config = {
        "model.name": str(model), "train.local-steps": 2, "train.batch-size": 4, "train.seq-length": 64,
        "train.lr-max": 5e-3, "domain": "finance",
    }  # fmt: skip
    node_config = {"data-path": str(data), "columns": "input=text,output=label", "name": "silo-a"}
    policy = data.with_name("policy.toml")  # the tiny model is a local directory: allowed by name
    policy.write_text("allow-local-paths = true\n")
    node_config["policy-file"] = str(policy)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    config = ConfigRecord({"server-round": server_round, "lr": 5e-3})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=1, message_type="train"), context


def test_model_loads_once_data_reloads_on_change_and_rss_stays_flat(resident_mode, tmp_path) -> None:
    from silo_node.app.client_app import train
    from silotune.adapters import to_array_record
    from silotune.config import parse_run_config

    model = make_tiny_llama(tmp_path / "tiny")
    data = _data(tmp_path / "data.jsonl")
    run = parse_run_config({"model.name": str(model)})
    init = resident_mode.model_with_adapter(run.model, run.peft, run.peft.rank, run.train.seed).init_state
    from silotune.wire_codec import Encoding, encode

    arrays = to_array_record(encode(init, Encoding()))  # fp32, packed: the default transport
    rss: dict[int, int] = {}
    for rnd in range(1, 21):
        msg, ctx = _message_and_context(model, data, rnd, arrays)
        reply = train(msg, ctx)
        assert not reply.has_error(), reply.error
        arrays = reply.content["arrays"]
        rss[rnd] = resident_mode.current_rss_bytes()
    assert resident_mode.counters.model_loads == 1
    assert resident_mode.counters.data_loads == 1
    assert rss[20] <= 1.05 * rss[2], f"RSS grew from {rss[2]} to {rss[20]} bytes"

    # A changed data file is noticed (path + mtime + size) and re-read; the model stays loaded.
    _data(data, n=30, seed=1)
    os.utime(data, ns=(0, os.stat(data).st_mtime_ns + 10**9))
    msg, ctx = _message_and_context(model, data, 21, arrays)
    assert not train(msg, ctx).has_error()
    assert resident_mode.counters.data_loads == 2
    assert resident_mode.counters.model_loads == 1
