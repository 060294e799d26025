"""The protocol's names have one home (silotune/protocol.py): the round's two ends never spell them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from silo_node.app.memory import MemoryPeaks
from silotune import protocol as p

REPO = Path(__file__).resolve().parents[1]
# The round's writers and readers: the ClientApp, the round loop and its core, the reply checks,
# the strategies, and compare's in-process federation.
ROUND_FILES = [
    "silo_node/app/client_app.py",
    "superlink/app/rounds.py",
    "superlink/app/round_core.py",
    "superlink/app/exchange.py",
    "superlink/app/silo_registry.py",
    "superlink/app/reply_checks.py",
    "evaluation/inprocess.py",
    *[str(f.relative_to(REPO)) for f in sorted((REPO / "superlink" / "app" / "strategies").glob("*.py"))],
]
NOT_KEYS = {"PROGRESS_PREFIX", "DONE_PREFIX", "FAILED_MARK"}
MESSAGE_KEYS = {
    value: name
    for name, value in vars(p).items()
    if name.isupper() and isinstance(value, str) and name not in NOT_KEYS
    and not name.startswith(("R_", "EV_", "F_"))
    and "_" not in value  # the snake_case memory fields are event fields, not message keys
}  # fmt: skip
# A run-config key that happens to equal a message key: the resume check compares config keys.
ALLOWED = {("superlink/app/rounds.py", "domain")}


def string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module except docstrings and f-string parts."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    ]


@pytest.mark.parametrize("rel", ROUND_FILES)
def test_no_round_file_spells_a_message_key_again(rel: str) -> None:
    spelled = [
        f"{rel}:{line}: {value!r} (use protocol.{MESSAGE_KEYS[value]})"
        for line, value in string_literals(REPO / rel)
        if value in MESSAGE_KEYS and (rel, value) not in ALLOWED
    ]
    assert not spelled, "\n".join(spelled)


def test_message_keys_are_unique() -> None:
    names = [n for n, v in vars(p).items() if n.isupper() and isinstance(v, str) and v in MESSAGE_KEYS]
    assert len(names) == len(MESSAGE_KEYS), "two protocol names share one value"


def test_the_silos_memory_meter_fills_exactly_the_protocols_memory_fields() -> None:
    assert tuple(f.name for f in dataclasses.fields(MemoryPeaks)) == p.MEMORY_FIELDS
    assert all(p.metric_key(f) == f.replace("_", "-") for f in p.MEMORY_FIELDS)


def test_every_event_kind_is_emitted_and_read_through_its_constant() -> None:
    """Writers (`.emit("kind", ...)`) and readers (`e["kind"] == ...`) use protocol.EV_*."""
    kinds = set(p.EVENT_KINDS)
    files = [*ROUND_FILES, "monitoring/report.py", "monitoring/exporter.py", "demo/demo.py"]
    spelled = []
    for rel in files:
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            is_emit = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if is_emit and node.func.attr == "emit":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and first.value in kinds:
                    spelled.append(f"{rel}:{node.lineno}: emit({first.value!r})")
            if isinstance(node, ast.Compare):
                for c in node.comparators:
                    if isinstance(c, ast.Constant) and c.value in kinds:
                        spelled.append(f"{rel}:{node.lineno}: == {c.value!r}")
    assert not spelled, "\n".join(spelled)


def test_the_exporter_handles_every_server_and_silo_kind_it_counts() -> None:
    from monitoring.exporter import EVENT_HANDLERS

    unnamed = set(EVENT_HANDLERS) - set(p.EVENT_KINDS)
    assert not unnamed, f"exporter handlers for kinds the protocol does not name: {unnamed}"
    assert {p.EV_SILO_RESULT, p.EV_LOCAL_TRAIN, p.EV_ROUND_END, p.EV_RUN_END} <= set(EVENT_HANDLERS)


@pytest.mark.parametrize("rel", ["superlink/app/rounds.py", "superlink/ops/run_journal.py"])
def test_run_end_statuses_are_written_and_read_through_their_constants(rel: str) -> None:
    statuses = set(p.RUN_STATUSES)
    spelled = [f"{rel}:{line}: {value!r}" for line, value in string_literals(REPO / rel) if value in statuses]
    assert not spelled, "\n".join(spelled)
    assert set(p.CLOSING_STATUSES) < statuses


EVENT_FIELDS = {v: name for name, v in vars(p).items() if name.startswith("F_") and isinstance(v, str)}


def dict_keys_and_set_members(path: Path) -> list[tuple[int, str]]:
    """String constants used as a dict literal's key, a subscript (``e["round"]``), a ``.get()``
    key, or a set/tuple-of-names member: where an event field is written or read by name."""
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        consts: list[ast.expr | None] = []
        if isinstance(node, ast.Dict):
            consts = list(node.keys)
        elif isinstance(node, ast.Set):
            consts = list(node.elts)
        elif isinstance(node, ast.Subscript):
            consts = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            consts = node.args[:1]
        strings = [c for c in consts if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        found += [(c.lineno, c.value) for c in strings]
    return found


@pytest.mark.parametrize(
    "rel", ["superlink/app/rounds.py", "superlink/app/exchange.py", "superlink/app/silo_registry.py",
            "superlink/ops/submit.py", "monitoring/exporter.py"],
)  # fmt: skip
def test_event_fields_are_written_and_read_through_their_constants(rel: str) -> None:
    """The round summary and each silo_result row are built as dicts: their keys are protocol.F_*,
    so the round_end event, the SILOTUNE-ROUND line and their readers cannot spell them apart."""
    spelled = [
        f"{rel}:{line}: {value!r} (use protocol.{EVENT_FIELDS[value]})"
        for line, value in dict_keys_and_set_members(REPO / rel)
        if value in EVENT_FIELDS
    ]
    assert not spelled, "\n".join(spelled)


def test_the_progress_line_carries_the_round_end_summary() -> None:
    """`silotune run` follows SILOTUNE-ROUND lines: each field it reads is one round_end carries too."""
    assert set(p.PROGRESS_FIELDS) <= set(EVENT_FIELDS)
