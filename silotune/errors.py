"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with 2."""


class UserError(Exception):
    """Base for errors that say what was wrong, where, and what to do."""


class DataError(UserError, ValueError):
    """A silo's data file is missing, empty, unreadable, mis-encoded or lacks columns."""


class ModelMismatchError(UserError):
    """A silo runs a different base model than the federation."""


class NoLearningError(RuntimeError):
    """A silo's round changed no trainable parameter, or every gradient was zero or non-finite.

    Such a round must never be sent back as an update: an unchanged adapter looks exactly like a
    trained one to the server, and silently averages the federation toward doing nothing.
    """


class PolicyRefused(UserError):  # noqa: N818 - a refusal, not a bug
    """A run asks a silo for more than the silo's own policy allows (silo_node/app/policy.py).

    The message is the detail, for the silo's log and audit log only; the central site gets the
    code POLICY_REFUSED and its fixed text."""


class ApprovalPending(UserError):  # noqa: N818 - a state, not a bug
    """A new run waits at a silo for its operator's `silotune silo approve RUN_ID`."""


class InitRefused(UserError):  # noqa: N818 - a refusal, not a bug
    """The adapter a run starts from is not the one this silo derives from the run's seed: a silo
    trains only from a starting point it would have made itself (another silo may have chosen it)."""


class PrivacyBudgetExhausted(UserError):  # noqa: N818 - a refusal, not a bug
    """A round would take a silo past the epsilon budget its own policy sets ([privacy]
    epsilon-budget, silo_node/app/privacy.py). The detail stays at the silo; the central site gets the
    code PRIVACY_BUDGET_EXHAUSTED and its fixed text."""
