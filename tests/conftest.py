"""Fixtures shared across the test areas. Helpers that are not fixtures live in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture()
def flower_task_identity() -> Iterator[int]:
    """A Flower task identity for building Messages outside a Flower process; yields the run id.

    Messages read the run id from Flower's process-wide task identity (set by flwr-serverapp and
    flwr-clientapp); the previous values are restored afterwards.
    """
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield 1
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, randomly initialised Llama and tokenizer on disk (tests/support/tiny_model.py), built once."""
    from tests.support.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")
