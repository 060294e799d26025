"""A second local user on a silo host, trying to speak for the silo on its Runtime API.

Run as a script (tests/test_runtime_auth_e2e.py starts it under another uid where it can), with
only Flower's own client code: ``python runtime_intruder.py HOST:PORT SECONDS SECRET_PATH``. For
SECONDS (or until it gets something) it tries, over and over:

- AcquireTask without the SuperExec secret (a task would hand it the token: the task's message,
  the run's context with the silo's node config, and the right to reply for the silo);
- AcquireTask signed with a secret of its own making;
- PullTaskInput (reads the node config) and PushTaskOutput (pushes back a changed context: a
  policy file, data path and state dir of its choosing) with made-up task tokens;
- reading the secret file itself.

It prints one JSON object: per action, how often it was refused and how often it got through,
and the first refusal texts. It never writes anything but that line.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from typing import Any


def _client(address: str, token: str | None = None, secret: bytes | None = None) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )


def _hostile_context() -> Any:
    from flwr.app import Context, RecordDict
    from flwr.common.serde import context_to_proto

    node_config = {
        "data-path": "/tmp/intruder-data.jsonl",
        "policy-file": "/tmp/intruder-policy.toml",
        "state-dir": "/tmp/intruder-state",
        "name": "intruder",
    }
    return context_to_proto(
        Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    )


def main(argv: list[str]) -> int:
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        PullTaskInputRequest,
        PushTaskOutputRequest,
    )
    from flwr.supercore.constant import TaskType

    address, seconds, secret_path = argv[0], float(argv[1]), argv[2]
    tally: dict[str, dict[str, Any]] = {}

    def note(action: str, through: bool, detail: str) -> None:
        t = tally.setdefault(action, {"refused": 0, "through": 0, "details": []})
        t["through" if through else "refused"] += 1
        if len(t["details"]) < 3 and detail not in t["details"]:
            t["details"].append(detail[:300])

    def attempt(action: str, call: Any) -> None:
        try:
            res = call()
        except Exception as exc:  # noqa: BLE001 - a refusal is what we hope for
            note(action, False, f"{type(exc).__name__}: {exc}")
            return
        # An acquire answered without a token found no task: not through, not refused either.
        through = bool(getattr(res, "token", "")) or not action.startswith("acquire_task")
        note(action, through, type(res).__name__)

    plain = _client(address)
    forged = _client(address, secret=secrets.token_hex(32).encode())
    deadline = time.monotonic() + seconds
    acquire = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # report, then end
    while time.monotonic() < deadline and not stop:
        attempt("acquire_task", lambda: plain.AcquireTask(acquire))
        attempt("acquire_task_forged", lambda: forged.AcquireTask(acquire))
        guessed = _client(address, token=secrets.token_hex(16))
        try:
            attempt("pull_task_input", lambda c=guessed: c.PullTaskInput(PullTaskInputRequest()))
            attempt(
                "push_task_output",
                lambda c=guessed: c.PushTaskOutput(
                    PushTaskOutputRequest(context=_hostile_context(), sub_status="COMPLETED", details="")
                ),
            )
        finally:
            guessed.close()
        try:
            with open(secret_path, "rb") as fh:
                note("read_secret", True, f"read {len(fh.read())} bytes")
        except OSError as exc:
            note("read_secret", False, f"{type(exc).__name__}: {exc.strerror}")
        if any(t["through"] for k, t in tally.items() if k != "read_secret"):
            break
        time.sleep(0.25)
    plain.close()
    forged.close()
    print(json.dumps(tally, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
