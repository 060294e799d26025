"""Keep third-party libraries quiet where their output concerns nobody.

Two things, both narrow:

* ``silence_irrelevant_warnings()`` drops exactly the library messages that say nothing about what
  SiloTune does. Today that is one: on CPUs with AVX512-BF16, importing bitsandbytes (which
  ``import peft`` does) logs "Failed to load CPU gemm_4bit_forward from kernels-community" through
  the ``bitsandbytes.backends.cpu.ops`` logger when the optional ``kernels`` package is missing.
  That kernel only speeds up 4-bit matmuls on the CPU; nothing fails without it. A filter on that
  one logger drops that one message; every other bitsandbytes message still gets through. Call it
  before bitsandbytes is imported (logger filters only see records logged after they are added):
  the demo calls it at start, and ``silotune.modeling`` may call it at import time so that every
  process that loads a model (the ClientApps of the silos too) gets it. Likewise one warning:
  peft probes ``model.is_gradient_checkpointing``, which transformers 5 deprecated, so every
  ``get_peft_model`` prints a FutureWarning about code that is not ours; it is ignored by message
  and category, here and (through PYTHONWARNINGS, see ``silence_in_child_processes``) in the
  processes started afterwards.
* ``disable_progress_bars()`` turns off the tqdm bars of huggingface_hub, datasets and transformers
  (and tqdm in general) where nobody watches a terminal: in a log file every redraw of a bar is one
  more ``\\r`` fragment. It sets environment variables, so processes started afterwards (SuperLink,
  SuperNodes, ClientApps) inherit the setting, and switches off the libraries already imported.
  ``quiet_for(stream)`` does that only when ``stream`` is not a terminal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import MutableMapping
from typing import TextIO

# (logger name, message prefix) pairs dropped by silence_irrelevant_warnings().
IRRELEVANT_MESSAGES: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)

# (message prefix, category) of Python warnings ignored by silence_irrelevant_warnings(). No ':' or
# ',' in a prefix: they also go into PYTHONWARNINGS for child processes.
IRRELEVANT_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),  # peft's getattr, transformers 5
)

# Environment variables that switch off progress bars; processes started later inherit them.
PROGRESS_BAR_ENV: dict[str, str] = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers (it follows the hub)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets
    "TQDM_DISABLE": "1",  # any other tqdm bar (tqdm >= 4.66 reads TQDM_* overrides)
}


class _DropMessage(logging.Filter):
    """Drops records whose (unformatted) message starts with ``prefix``; passes everything else."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_irrelevant_warnings() -> None:
    """Install the narrow filters of IRRELEVANT_MESSAGES (idempotent, cheap, imports nothing)."""
    for name, prefix in IRRELEVANT_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    for text, category in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=category)


def silence_in_child_processes(env: MutableMapping[str, str] | None = None) -> None:
    """Add IRRELEVANT_WARNINGS to PYTHONWARNINGS in ``env`` (default os.environ), so that Python
    processes started from it ignore them too. (The logging filters need code in that process:
    ``silence_irrelevant_warnings()``.)"""
    target = os.environ if env is None else env
    entries = [e for e in target.get("PYTHONWARNINGS", "").split(",") if e]
    for text, category in IRRELEVANT_WARNINGS:
        entry = f"ignore:{text}:{category.__name__}"
        if entry not in entries:
            entries.append(entry)
    target["PYTHONWARNINGS"] = ",".join(entries)


def disable_progress_bars(env: MutableMapping[str, str] | None = None) -> None:
    """Progress bars off: in ``env`` (default os.environ; values the user set are kept) and in the
    libraries this process has already imported (none is imported here)."""
    target = os.environ if env is None else env
    for key, value in PROGRESS_BAR_ENV.items():
        target.setdefault(key, value)
    if env is not None and env is not os.environ:
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars as hub_off

        hub_off()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def quiet_for(stream: TextIO | None = None) -> bool:
    """Silence irrelevant warnings (here and in processes started later); switch progress bars off
    unless ``stream`` (default stderr, where tqdm draws) is a terminal. Returns whether it is one."""
    silence_irrelevant_warnings()
    silence_in_child_processes()
    interactive = is_terminal(sys.stderr if stream is None else stream)
    if not interactive:
        disable_progress_bars()
    return interactive
