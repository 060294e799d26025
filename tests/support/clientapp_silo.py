"""A scripted-grid silo that answers with SiloTune's real ClientApp handlers (silo_node/app/client_app.py).

Each has its own context, policy file, data and state dir, behind the real round loop of
tests/support/scripted_grid.py: the silo's real behaviour without processes (privacy interactions,
start adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from silo_node.app import client_app


class ClientAppSilo:
    """A scripted-grid silo that answers with SiloTune's real ClientApp handlers."""

    def __init__(
        self, tmp: Path, name: str, run: dict[str, Any], policy: str, rank: int | None = None,
        strict: bool = True,
    ) -> None:  # fmt: skip
        home = tmp / name
        home.mkdir()
        (home / "policy.toml").write_text(policy)
        rows = [{"text": f"{name} item {i}: shares {'rose' if i % 2 else 'fell'}",
                 "label": "positive" if i % 2 else "negative"} for i in range(12)]  # fmt: skip
        (home / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        node = {"name": name, "data-path": str(home / "data.jsonl"), "columns": "input=text,output=label",
                "state-dir": str(home / "state"), "policy-file": str(home / "policy.toml")}  # fmt: skip
        if rank is not None:
            node["lora-rank"] = rank
        self.state_dir = home / "state"
        self.strict = strict  # False: an error reply goes to the central site, as a real silo's does
        self.context = Context(1, 0, node, RecordDict(), run)

    def reply(self, msg: Message) -> RecordDict | Message:
        handler = {"query": client_app.handshake, "train": client_app.train, "evaluate": client_app.evaluate}
        out = handler[msg.metadata.message_type](msg, self.context)
        if out.has_error() and not self.strict:
            return out
        assert not out.has_error(), out.error
        return out.content
