"""Faults survived (issue 15): run-dir lock, bounded waits, Grid retries, handshake backoff, true
round counts, the round watchdog, per-silo reply latency. On a scripted Grid with a fake clock, so
hour-long waits take no time; the lock's dead-holder case uses a real second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message

from silotune.config import ConfigError, load_toml_run_config, parse_run_config
from silotune.events import read_events
from superlink.app.rounds import Federation
from tests.support.scripted_grid import FakeGrid, FakeSilo

pytestmark = pytest.mark.usefixtures("flower_task_identity")

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A monotonic clock that only the federation's sleeps move."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class TimedGrid(FakeGrid):
    """Replies become pullable ``delay(nid, type, round)`` seconds after the push; ``silent``
    messages are never answered. Records every push with the round it belongs to: the federation
    lists the nodes once at the run's start (round 0) and once at the start of every round."""

    def __init__(
        self,
        silos: dict[int, FakeSilo],
        clock: Clock,
        delay: Callable[[int, str, int], float] = lambda nid, mtype, rnd: 0.0,
        silent: Callable[[int, str, int], bool] = lambda nid, mtype, rnd: False,
    ) -> None:
        super().__init__(silos)
        self.clock, self.delay, self.silent = clock, delay, silent
        self.ready_at: dict[str, float] = {}
        self.pushes: list[tuple[int, str, int]] = []
        self.round = -1
        self.node_id_failures = 0  # get_node_ids raises "database is locked" this many times
        self.node_id_calls = 0
        self._next = 0

    def get_node_ids(self) -> Iterable[int]:
        self.node_id_calls += 1
        self.round += 1
        if self.node_id_failures > 0:
            self.node_id_failures -= 1
            raise RuntimeError("Server error '500 Internal Server Error' (database is locked)")
        return list(self.silos)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            self._next += 1
            mid = f"m{self._next}"
            m.metadata.__dict__["_message_id"] = mid
            nid, mtype = m.metadata.dst_node_id, m.metadata.message_type
            rnd = self.round
            self.pushes.append((nid, mtype, rnd))
            if not self.silent(nid, mtype, rnd):
                reply = Message(self.silos[nid].reply(m), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = nid
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.outbox[mid] = reply
                self.ready_at[mid] = self.clock() + self.delay(nid, mtype, rnd)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = self.clock()
        due = [i for i in list(message_ids) if i in self.outbox and self.ready_at[i] <= now]
        return [self.outbox.pop(i) for i in due]


def _fed(tmp_path: Path, grid: TimedGrid, clock: Clock, **cfg: object) -> Federation:
    base = {
        "num-rounds": 2,
        "strategy.min-nodes": 2,
        "strategy.round-timeout": 1000.0,
        "strategy.wait-for-nodes": 10.0,
        "peft.rank": 2,
        "run-dir": str(tmp_path / "run"),
    }
    base.update(cfg)
    return Federation(grid, parse_run_config(base), tmp_path / "run", sleep=clock.sleep, clock=clock)


def _events(tmp_path: Path, kind: str) -> list[dict]:
    return [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == kind]


def _two_silos() -> dict[int, FakeSilo]:
    return {1: FakeSilo("a"), 2: FakeSilo("b")}


# -- 1. run-dir lock -------------------------------------------------------------------------------


def test_second_serverapp_on_a_run_dir_is_refused_and_names_the_holder(tmp_path: Path) -> None:
    from superlink.app import server_app
    from superlink.app.run_lock import RunDirLocked, RunLock

    run_dir = tmp_path / "run"
    context = SimpleNamespace(run_config={"run-dir": str(run_dir), "num-rounds": 1}, run_id=22)
    with RunLock(run_dir, run_id="11"):
        with pytest.raises(RunDirLocked) as err:
            server_app.main(FakeGrid(_two_silos()), context)  # the second ServerApp
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "run 11" in msg and str(run_dir) in msg
    # Refused before writing anything: the holder's event log is not touched by the intruder.
    assert not (run_dir / "events.jsonl").exists()


def test_lock_is_held_for_the_run_and_released_after(tmp_path: Path) -> None:
    from superlink.app.run_lock import RunDirLocked, RunLock

    clock = Clock()
    seen: list[str] = []

    class Probe(TimedGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            try:  # mid-run: a second claim on the run dir must fail
                RunLock(tmp_path / "run", "intruder").acquire()
            except RunDirLocked as exc:
                seen.append(str(exc))
            return super().pull_messages(message_ids)

    _fed(tmp_path, Probe(_two_silos(), clock), clock, **{"num-rounds": 1}).run()
    assert seen and all(f"pid {os.getpid()}" in s for s in seen)
    with RunLock(tmp_path / "run", "next"):  # free again once the run has ended
        pass


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    from superlink.app.run_lock import RunDirLocked, RunLock

    run_dir = tmp_path / "run"
    code = (
        "import sys, time; from superlink.app.run_lock import RunLock; "
        f"RunLock({str(run_dir)!r}, 'old').acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {proc.pid} .*run old"):
            RunLock(run_dir, "new").acquire()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the lock file stays behind with the dead pid in it
        proc.wait(timeout=30)
    assert (run_dir / "run.lock").exists()
    with RunLock(run_dir, "new"):
        holder = json.loads((run_dir / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["run_id"] == "new"


# -- 3. bounded waits in the config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("strategy.round-timeout", "inf"),
        ("strategy.round-timeout", float("inf")),
        ("strategy.round-timeout", float("nan")),
        ("strategy.round-timeout", 8 * 24 * 3600.0),
        ("strategy.round-timeout", 0),
        ("strategy.wait-for-nodes", "inf"),
        ("strategy.wait-for-nodes", 1e12),
        ("strategy.wait-for-nodes", -1),
        ("strategy.watchdog-factor", float("inf")),
        ("strategy.watchdog-factor", 0.5),
    ],
)
def test_unbounded_or_absurd_waits_are_refused_by_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert key in str(err.value)


def test_bounded_waits_and_watchdog_factor_parse(tmp_path: Path) -> None:
    cfg = parse_run_config(
        {
            "strategy.round-timeout": 7 * 24 * 3600.0,
            "strategy.wait-for-nodes": 5,
            "strategy.watchdog-factor": 5,
        }
    )
    assert cfg.strategy.round_timeout == 604800 and cfg.strategy.watchdog_factor == 5
    f = tmp_path / "run.toml"
    f.write_text("[strategy]\nround-timeout = inf\n")  # TOML's own infinity
    with pytest.raises(ConfigError, match=r"strategy\.round-timeout: Input should be a finite number"):
        load_toml_run_config(f)


def test_pyproject_defaults_parse_and_name_the_new_keys() -> None:
    import tomllib

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {"strategy.wait-for-nodes", "strategy.watchdog-factor"} <= set(defaults)
    parse_run_config(defaults)


# -- 4. Grid calls retried -----------------------------------------------------------------------------


def test_node_listing_survives_database_is_locked(tmp_path: Path) -> None:
    clock = Clock()
    grid = TimedGrid(_two_silos(), clock)
    grid.node_id_failures = 3
    fed = _fed(tmp_path, grid, clock, **{"num-rounds": 1})
    assert fed.run() is not None
    assert grid.node_id_calls > 3


def test_grid_calls_back_off_until_the_deadline_and_raise_permanent_errors_at_once() -> None:
    import httpx

    from superlink.app.exchange import GridCalls, GridUnavailable, is_transient

    clock = Clock()
    calls = GridCalls(clock.sleep, clock, first_delay=0.5, max_delay=4.0)
    waits: list[float] = []
    start = clock()

    def always_busy() -> None:
        waits.append(clock() - start)
        raise RuntimeError("database is locked")

    with pytest.raises(GridUnavailable, match="get_node_ids .*database is locked"):
        calls.call("get_node_ids", always_busy, deadline=start + 20.0)
    gaps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0] and max(gaps) == 4.0  # exponential, capped
    assert clock() - start <= 20.0

    def bad_message() -> None:
        raise ValueError("Invalid message")

    with pytest.raises(ValueError):
        calls.call("push_messages", bad_message, deadline=clock() + 100.0)

    req = httpx.Request("POST", "http://127.0.0.1/api")
    assert is_transient(httpx.HTTPStatusError("", request=req, response=httpx.Response(500, request=req)))
    assert is_transient(httpx.ConnectError("refused", request=req))
    assert not is_transient(httpx.HTTPStatusError("", request=req, response=httpx.Response(403, request=req)))


# -- 6. the true round count in every outcome ---------------------------------------------------------


def test_a_run_that_fails_mid_run_reports_its_true_round_count(tmp_path: Path) -> None:
    from superlink.app.exchange import GridUnavailable

    clock = Clock()

    class DiesAfterRoundOne(TimedGrid):
        def get_node_ids(self) -> Iterable[int]:
            if self.round >= 1:  # from round 2's listing on
                raise RuntimeError("database is locked")  # for good, this time
            return super().get_node_ids()

    fed = _fed(tmp_path, DiesAfterRoundOne(_two_silos(), clock), clock, **{"num-rounds": 3})
    with pytest.raises(GridUnavailable):
        fed.run()
    ends = _events(tmp_path, "run_end")
    assert len(ends) == 1
    assert ends[0]["status"] == "failed" and ends[0]["rounds_completed"] == 1
    assert "GridUnavailable" in ends[0]["reason"] and "get_node_ids" in ends[0]["reason"]


def test_serverapp_failure_writes_one_run_end_with_the_true_count(tmp_path: Path) -> None:
    from superlink.app import server_app

    run_dir = tmp_path / "run"
    good = server_app.main  # a first run completes one round
    good(FakeGrid(_two_silos()), SimpleNamespace(run_config=_cfg(run_dir, 1), run_id=1))
    # The resumed run fails in its first new round: a non-transient error from the Grid.
    grid = FakeGrid(_two_silos())
    pushes = {"n": 0}
    real_push = grid.push_messages

    def push(messages: Iterable[Message]) -> Iterable[str]:
        pushes["n"] += 1
        if pushes["n"] > 1:  # the handshake passes, the training push fails
            raise ValueError("Invalid message (simulated)")
        return real_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="simulated"):
        server_app.main(grid, SimpleNamespace(run_config=_cfg(run_dir, 3), run_id=2))
    ends = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "run_end"]
    assert [e["status"] for e in ends] == ["completed", "failed"]
    assert ends[-1]["rounds_completed"] == 1 and "simulated" in ends[-1]["reason"]


def _cfg(run_dir: Path, rounds: int) -> dict[str, object]:
    return {
        "run-dir": str(run_dir),
        "num-rounds": rounds,
        "peft.rank": 2,
        "strategy.round-timeout": 2.0,
        "strategy.wait-for-nodes": 1.0,
    }


# -- 5. handshake backoff ----------------------------------------------------------------------------


def test_a_silo_that_keeps_failing_its_handshake_is_asked_less_and_less(tmp_path: Path) -> None:
    clock = Clock()
    silos = {**_two_silos(), 3: FakeSilo("broken")}
    grid = TimedGrid(silos, clock, silent=lambda nid, mtype, rnd: nid == 3 and mtype == "query")
    fed = _fed(tmp_path, grid, clock, **{"num-rounds": 8, "strategy.round-timeout": 50.0})
    fed.run()
    asked = [rnd for nid, mtype, rnd in grid.pushes if nid == 3 and mtype == "query"]
    assert asked == [0, 1, 3, 7]  # every round before (9 asks, 9 round timeouts)
    failed = [e for e in _events(tmp_path, "silo_failed") if e["node_id"] == 3]
    assert [e["retry_round"] for e in failed] == [1, 3, 7, 15]


def test_backoff_is_capped() -> None:
    from superlink.app.silo_registry import HandshakeBackoff

    b = HandshakeBackoff(cap_rounds=4)
    rnd = 0
    for _ in range(6):
        rnd = b.failed(5, rnd)
    assert rnd == 1 + 2 + 4 + 4 + 4 + 4  # 1, 2, 4, then the cap
    assert not b.due(5, rnd - 1) and b.due(5, rnd)


ALL = frozenset({1, 2})

# -- 7. the watchdog -------------------------------------------------------------------------------------


def _slow_silos(clock: Clock, silent_rounds: set[int], silent_nodes: frozenset[int] = ALL) -> TimedGrid:
    """Silos that train for 30 s, and say nothing in ``silent_rounds``."""
    return TimedGrid(
        _two_silos(),
        clock,
        delay=lambda nid, mtype, rnd: 30.0 if mtype == "train" else 0.0,
        silent=lambda nid, mtype, rnd: mtype == "train" and rnd in silent_rounds and nid in silent_nodes,
    )


def test_watchdog_fails_a_round_without_progress_and_the_run_goes_on(tmp_path: Path) -> None:
    clock = Clock()
    fed = _fed(tmp_path, _slow_silos(clock, {3}), clock, **{"num-rounds": 4})
    fed.run()
    stalled = _events(tmp_path, "round_stalled")
    assert [e["round"] for e in stalled] == [3]
    assert "watchdog: no progress" in stalled[0]["reason"] and "median of 2" in stalled[0]["reason"]
    starts = {e["round"]: e["ts"] for e in _events(tmp_path, "round_start")}
    assert set(starts) == {1, 2, 3, 4}
    end = _events(tmp_path, "run_end")[-1]
    assert end["status"] == "completed" and end["rounds_completed"] == 4
    # Rounds 1-2 took ~31 s, so the bound is max(60, 3 x 31); round 3 gave up long before 1000 s.
    assert fed.watchdog.bound() < 100


def test_watchdog_drops_only_the_silent_silo_when_others_answered(tmp_path: Path) -> None:
    clock = Clock()
    fed = _fed(tmp_path, _slow_silos(clock, {3}, frozenset({2})), clock, **{"num-rounds": 3})
    t0 = clock()
    fed.run()
    assert not _events(tmp_path, "round_stalled")
    failed = [e for e in _events(tmp_path, "silo_failed") if e["round"] == 3]
    assert [e["node_id"] for e in failed] == [2] and "watchdog" in failed[0]["reason"]
    assert [e["answered"] for e in _events(tmp_path, "round_end")] == [2, 2, 1]
    assert clock() - t0 < 400  # not the 1000 s round timeout


def test_replies_that_came_while_a_pull_blocked_past_the_deadline_are_kept(tmp_path: Path) -> None:
    """Seen in CI on the silo-kill scenario: silo a died while uploading its reply, Flower's Grid
    waited ~180 s for that reply's objects inside one pull_messages call, and silo b's reply, there
    since 3 s, was dropped as "no reply within 90 s" because the deadline had passed meanwhile."""
    clock = Clock()

    class BlocksOnce(TimedGrid):
        blocked = False

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            ids = list(message_ids)
            if self.round == 1 and not self.blocked:
                self.blocked = True
                self.clock.t += 200.0  # waiting for the dead silo's objects
                return []
            return super().pull_messages(ids)

    grid = BlocksOnce(
        _two_silos(),
        clock,
        delay=lambda nid, mtype, rnd: 3.0 if mtype == "train" else 0.0,
        silent=lambda nid, mtype, rnd: (nid, mtype, rnd) == (1, "train", 1),
    )
    _fed(tmp_path, grid, clock, **{"num-rounds": 1, "strategy.round-timeout": 90.0}).run()
    assert grid.blocked
    ends = _events(tmp_path, "round_end")
    assert [(e["answered"], e["adapter_updated"]) for e in ends] == [(1, True)]
    assert [e["silo"] for e in _events(tmp_path, "silo_result")] == ["b"]
    assert [e["silo"] for e in _events(tmp_path, "silo_failed")] == ["a"]


def test_rounds_stalled_in_a_row_end_the_run_cleanly(tmp_path: Path) -> None:
    from superlink.app.watchdog import MAX_CONSECUTIVE_STALLS

    clock = Clock()
    fed = _fed(tmp_path, _slow_silos(clock, set(range(2, 20))), clock, **{"num-rounds": 10})
    assert fed.run() is not None  # round 1's checkpoint
    assert len(_events(tmp_path, "round_stalled")) == MAX_CONSECUTIVE_STALLS
    end = _events(tmp_path, "run_end")[-1]
    assert end["status"] == "stalled" and end["rounds_completed"] == 1 and "no progress" in end["reason"]


# -- 8. slow silos visible ------------------------------------------------------------------------------


def test_reply_latency_per_silo_is_recorded(tmp_path: Path) -> None:
    clock = Clock()
    grid = TimedGrid(
        _two_silos(), clock, delay=lambda nid, mtype, rnd: 12.0 if (nid, mtype) == (2, "train") else 0.0
    )
    _fed(tmp_path, grid, clock, **{"num-rounds": 1}).run()
    latency = {e["silo"]: e["reply_seconds"] for e in _events(tmp_path, "silo_result")}
    assert latency["a"] == 0.0 and 12.0 <= latency["b"] <= 13.0  # pulls poll once a second
    replies = _events(tmp_path, "silo_reply")
    assert {(e["node_id"], e["phase"]) for e in replies} >= {(1, "train"), (2, "train")}


def test_exporter_shows_latency_progress_and_stalls() -> None:
    from monitoring.exporter import FederationState
    from silotune import metrics as m

    state = FederationState()
    state.apply({"ts": 100.0, "kind": "run_start", "num_rounds": 3, "progress_timeout_seconds": 2460.0})
    state.apply({"ts": 110.0, "kind": "round_start", "round": 1, "sampled": [1, 2]})
    state.apply({"ts": 150.0, "kind": "silo_reply", "round": 1, "node_id": 2, "reply_seconds": 40.0})
    state.apply(
        {"ts": 151.0, "kind": "silo_result", "round": 1, "node_id": 2, "silo": "b", "reply_seconds": 40.0}
    )
    state.apply({"ts": 900.0, "kind": "round_stalled", "round": 2, "reason": "watchdog: ..."})
    g, c = state.gauges, state.counters
    assert g[m.SILO_REPLY_SECONDS.name][("b",)] == 40.0
    assert g[m.LAST_PROGRESS_TS.name][()] == 151.0  # a stall is not progress
    assert g[m.PROGRESS_TIMEOUT.name][()] == 2460.0
    assert c[m.ROUNDS_STALLED.name][()] == 1.0 and g[m.ROUND_IN_PROGRESS.name][()] == 0.0
