"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with 2."""


class UserError(Exception):
    """Base for errors that say what was wrong, where, and what to do."""


class DataError(UserError, ValueError):
    """A silo's data file is missing, empty, unreadable, mis-encoded or lacks columns."""


class ModelMismatchError(UserError):
    """A silo runs a different base model than the federation."""
