"""The resident silo worker: one long-lived process that serves the SuperNode's ClientApp tasks.

Flower 1.41 starts a fresh ``flwr-clientapp`` process per message, which installs the FAB the
SuperLink sent, imports torch and transformers and loads the base model, every round. With
``flower-supernode --isolation process`` the SuperNode spawns nothing and serves its tasks on the
local Runtime API instead; this worker takes them from there, the way Flower's own SuperExec
(flwr/supercore/superexec/run_superexec.py) and flwr-clientapp (flwr/supernode/runtime/
run_clientapp.py) do, but executes the SiloTune ClientApp installed at the silo in-process, with
its base model, tokenizer and encoded data kept loaded (silo_node/app/resident.py).

Per task: AcquireTask (type flwr-clientapp) -> with the task's token, pull_task_input (message,
context, run, FAB) -> heartbeat while working -> the app -> push_message(reply) and
push_task_output(COMPLETED/FAILED). Flower's own functions do the wire work.

Code pinning (silo_node/ops/pinning.py): a task whose FAB is not exactly the installed SiloTune code
is answered with APP_NOT_ALLOWED before any of its code is installed or imported, unless the silo
policy's ``allowed-apps`` lists its FAB hash; such an app is handed to ``flwr-clientapp``, as
Flower's subprocess executor would.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import FrameType
from typing import Any

# The allotment's environment (CUDA_VISIBLE_DEVICES, SILOTUNE_THREADS) is set by the launcher
# before this process starts, so torch sees only the devices it was given when it is imported.

TASK_POLL_SECONDS = 0.2  # idle poll of the Runtime API; Flower's SuperExec polls every 1 s
# A task's message is pulled from the SuperNode on this host, which stores it only once it has all
# of it: its objects are there at once, or never (the SuperNode dropped the message of a run that
# is no longer running, e.g. after a SuperLink restart). Flower's own pull waits up to 2 hours for
# them; a worker that serves one task at a time must give up sooner, or the silo stops answering.
TASK_INPUT_SECONDS = 60.0
MAX_IDLE_BACKOFF = 5.0
PIDFILE = "worker.pid"
TASKFILE = "worker.task"  # present while a task is being served: what the worker is doing now


class TaskAbandoned(Exception):
    """The SuperNode no longer wants the task (heartbeat refused, run stopped): drop it."""


class _Signals:
    """SIGINT/SIGTERM while a task runs abort that task; while idle, they end the worker.

    Flower's heartbeat sender raises SIGINT when the SuperNode declares the task dead: in Flower's
    one-message process that ends the process, here it must only end the task.
    """

    def __init__(self) -> None:
        self.in_task = False
        self.stop = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_int)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        if self.in_task:
            raise TaskAbandoned("the SuperNode abandoned the task")
        self.stop = True

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True
        if self.in_task:
            raise TaskAbandoned("the worker was asked to stop")


def _policy_allowed_apps(policy_file: str) -> frozenset[str]:
    """FAB hashes the silo operator allows besides the installed SiloTune app (re-read each task)."""
    from silo_node.app.policy import load_policy

    policy = load_policy(policy_file)
    return frozenset(h.lower() for h in getattr(policy, "allowed_apps", ()) or ())


class Worker:
    """Serves tasks until stopped; ``max_tasks`` bounds it for tests and benchmarks (0 = no bound)."""

    def __init__(
        self,
        runtime_api_address: str,
        policy_file: str = "",
        state_dir: Path | None = None,
        poll: float = TASK_POLL_SECONDS,
        max_tasks: int = 0,
        secret: bytes | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.secret = secret  # signs AcquireTask (silo_node/app/runtime_auth.py); None: unauthenticated
        self.policy_file = policy_file
        self.state_dir = state_dir
        self.poll = poll
        self.max_tasks = max_tasks
        self.signals = _Signals()
        self.foreign: list[subprocess.Popen[bytes]] = []
        self.served = 0

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType

        self.signals.install()
        client = self._client(token=None)
        idle = self.poll
        log(INFO, "SiloTune worker serving ClientApp tasks from %s (pid %d)", self.address, os.getpid())
        try:
            while not self.signals.stop and (self.max_tasks <= 0 or self.served < self.max_tasks):
                self._reap()
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except Exception as exc:  # noqa: BLE001 - the SuperNode restarting: back off, retry
                    if "401" in str(exc) or "authentication" in str(exc).lower():
                        log(ERROR, "the Runtime API at %s refused this worker (%s): it was started with "
                            "another --superexec-auth-secret-file; retrying", self.address, exc)  # fmt: skip
                    else:
                        log(WARNING, "Runtime API at %s not answering (%s); retrying", self.address, exc)
                    time.sleep(min(idle, MAX_IDLE_BACKOFF))
                    idle = min(idle * 2, MAX_IDLE_BACKOFF)
                    continue
                idle = self.poll
                if res.HasField("task") and res.token:
                    self.handle(res.task, res.token)
                    self.served += 1
                else:
                    time.sleep(self.poll)
        finally:
            client.close()
            self._reap(wait=True)
        return 0

    def _client(self, token: str | None) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")
        ]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        elif self.secret:
            from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

            from silo_node.app.runtime_auth import AUTHENTICATED_METHODS

            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=self.secret, protected_methods=AUTHENTICATED_METHODS
                )
            )
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # the Runtime API listens on loopback only
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),  # one per client: its 401 state is its own
        )

    # -- one task -------------------------------------------------------------------------------
    def handle(self, task: Any, token: str) -> None:
        from flwr.supercore import log

        try:
            allowed = _policy_allowed_apps(self.policy_file)
        except Exception as exc:  # noqa: BLE001 - a broken policy allows nothing extra
            log(ERROR, "silo policy %s unreadable (%s): only the installed app runs", self.policy_file, exc)
            allowed = frozenset()
        if task.fab_hash and task.fab_hash.lower() in allowed:
            self._spawn_foreign(task, token)
            return
        self._serve_in_process(task, token)

    def _spawn_foreign(self, task: Any, token: str) -> None:
        """An app the operator allowed by hash runs as Flower runs it: its own flwr-clientapp."""
        from flwr.supercore import log

        log(INFO, "task %d: app %s allowed by policy: flwr-clientapp", task.task_id, task.fab_hash[:12])
        self._audit("foreign_app", run_id=str(task.run_id), fab_hash=task.fab_hash)
        argv = [
            _flwr_clientapp(), "--runtime-api-address", self.address, "--token", token,
            "--insecure", "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        self.foreign.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))

    def _serve_in_process(self, task: Any, token: str) -> None:
        from flwr.app import Error, Message
        from flwr.common.constant import SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from silo_node.ops.pinning import fab_digest, installed_digest, is_own_app
        from silotune.silo_failures import SiloFailure, classify, reason_for

        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "SiloTune worker: task failed"
        self.signals.in_task = True
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client, TASK_INPUT_SECONDS)
            self._mark_busy(f"{task.task_id} run {run.run_id} {message.metadata.message_type}")
            digest = fab_digest(fab.content)  # the zip is read in memory; nothing is installed
            if not is_own_app(run.fab_id, digest):
                code = SiloFailure.APP_NOT_ALLOWED
                log(
                    WARNING,
                    "refused run %s: app %s %s (FAB hash %s, content %s) is not the installed SiloTune "
                    "(content %s); to allow it, add its FAB hash to the policy's allowed-apps",
                    run.run_id, run.fab_id, run.fab_version, fab.hash_str, digest[:12],
                    installed_digest()[:12],
                )  # fmt: skip
                self._audit(
                    "refused", run_id=str(run.run_id), reason="app not allowed", fab_id=run.fab_id,
                    fab_version=run.fab_version, fab_hash=fab.hash_str, content_sha256=digest,
                )  # fmt: skip
                reply = Message(Error(code=int(code), reason=reason_for(code)), reply_to=message)
                details = code.name
            else:
                from silo_node.app.client_app import app

                reply = app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
        except TaskAbandoned as exc:
            log(WARNING, "task %d dropped: %s", task.task_id, exc)
            reply, details = None, str(exc)
        except ObjectPullError:
            # Nobody waits for this message any more (its run ended or was interrupted): drop it
            # and serve the next task, instead of blocking the silo behind it.
            log(WARNING, "task %d dropped: its message was not available within %.0f s (its run "
                "is probably no longer running)", task.task_id, TASK_INPUT_SECONDS)  # fmt: skip
            reply, details = None, "message unavailable"
        except Exception as exc:  # noqa: BLE001 - the reply carries a code, the log the detail
            code = classify(exc)
            log(ERROR, "task %d failed (%s)", task.task_id, code.name, exc_info=exc)
            if message is not None:
                reply = Message(Error(code=int(code), reason=reason_for(code)), reply_to=message)
            details = code.name
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except Exception as exc:  # noqa: BLE001 - the SuperNode expires the task by itself
                log(ERROR, "task %d: could not report to the SuperNode (%s)", task.task_id, exc)
            finally:
                self.signals.in_task = False
                self._mark_busy(None)
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                from silo_node.app import resident

                resident.after_message(None)

    def _mark_busy(self, what: str | None) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / TASKFILE
        try:
            if what is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(what + "\n")
        except OSError:
            pass

    def _reap(self, wait: bool = False) -> None:
        for proc in list(self.foreign):
            if wait and proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.poll() is not None:
                self.foreign.remove(proc)

    def _audit(self, kind: str, **fields: Any) -> None:
        if self.state_dir is None:
            return
        from silo_node.app.audit import append_audit

        try:
            append_audit(self.state_dir, kind, **fields)
        except OSError:
            pass


def pull_task_input(client: Any, max_time: float) -> tuple[Any, Any, Any, Any]:
    """(message, context, run, FAB) of the acquired task, as Flower's ``pull_task_input``
    (flwr/supernode/runtime/run_clientapp.py) pulls them, except that the message's objects are
    waited for at most ``max_time`` seconds (ObjectPullError after that), not Flower's 2 hours."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=max_time,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # not part of the deflated message
    return message, context, run, fab


def _flwr_clientapp() -> str:
    """flwr-clientapp from this interpreter's environment (the worker may run without PATH)."""
    beside = Path(sys.executable).with_name("flwr-clientapp")
    return str(beside) if beside.exists() else "flwr-clientapp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m silo_node.ops.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API HOST:PORT")
    parser.add_argument("--policy", default="", help="the silo policy file (allowed-apps)")
    parser.add_argument("--state-dir", default="", help="the silo's state dir (audit log, pid file)")
    parser.add_argument("--max-tasks", type=int, default=0, help="exit after this many tasks (0 = never)")
    parser.add_argument(
        "--superexec-auth-secret-file",
        default="",
        help="the secret the SuperNode's Runtime API was started with (silo_node/app/runtime_auth.py)",
    )
    args = parser.parse_args(argv)

    from silo_node.app import resident
    from silo_node.app.allotment import apply_threads_from_env
    from silotune.quiet_libraries import silence_irrelevant_warnings

    silence_irrelevant_warnings()
    resident.RESIDENT = True
    apply_threads_from_env()
    state_dir = Path(args.state_dir) if args.state_dir else None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / PIDFILE).write_text(str(os.getpid()))
    policy = args.policy or os.environ.get("SILOTUNE_SILO_POLICY", "")
    secret = None
    if args.superexec_auth_secret_file:
        from silo_node.app.runtime_auth import load_secret

        secret = load_secret(args.superexec_auth_secret_file)
    return Worker(args.runtime_api_address, policy, state_dir, max_tasks=args.max_tasks, secret=secret).run()


if __name__ == "__main__":
    sys.exit(main())
