"""The small exception hierarchy every layer raises from. The CLI turns these into one clear line."""


class EngramError(Exception):
    """Base class: a user-facing problem with a clear message (no traceback at the CLI)."""


class ConfigError(EngramError):
    """A setting is invalid."""


class StoreError(EngramError):
    """The fact store cannot be opened or written."""


class SchemaVersionError(StoreError):
    """The database was written by a newer Engram than this one."""


class ValidationError(EngramError):
    """A fact record is malformed; the message says which field and why."""


class ModelLoadError(EngramError):
    """A base model could not be found or loaded."""


class EditError(EngramError):
    """An edit could not be applied; the model is left unchanged."""


class NotFoundError(EngramError):
    """A fact, edit or run id does not exist."""


class FingerprintMismatchError(StoreError):
    """The store's edits belong to another base model (or gist add-on) than the one given."""
