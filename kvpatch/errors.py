"""Exception types. Every error kvpatch raises for bad input is one of these, so callers can catch
them as a group and scripts get one readable paragraph instead of a traceback through pydantic."""

from __future__ import annotations

import reprlib


class KVPatchError(Exception):
    """Base class of every kvpatch error."""


class ConfigError(KVPatchError, ValueError):
    """A pipeline config (YAML file, dict or name) is missing, malformed or invalid."""


class UnknownStageError(ConfigError, LookupError):
    """A config names a stage kind or implementation that is not registered."""


class UnsupportedModelError(KVPatchError, TypeError):
    """The model's family is not supported, or the patch did not take effect on it."""


class PatchStateError(KVPatchError, RuntimeError):
    """apply/unpatch called in the wrong state (already patched, not patched)."""


class CacheContractError(KVPatchError, ValueError):
    """A forward or generate call passes a cache in a way kvpatch cannot honour exactly (see
    kvpatch.patch.cache_args): refused instead of running a different computation."""


class OffloadSpaceError(KVPatchError, OSError):
    """The offloader's backing files cannot get the space they need (disk or quota full)."""


class SnapshotError(KVPatchError):
    """A cache snapshot cannot be written, read or used; the message names the path and field."""


class SnapshotCorruptError(SnapshotError):
    """The snapshot file is damaged: truncated, not safetensors, or a checksum or schema fails."""


class SnapshotMismatchError(SnapshotError):
    """An intact snapshot that does not fit: another format version, model, config or shape.

    `field` is the metadata field that differs; `expected` is what this process needs, `found`
    what the snapshot holds."""

    def __init__(self, path: object, field: str, expected: object, found: object, hint: str = "") -> None:
        self.field, self.expected, self.found = field, expected, found
        detail = f"; {hint}" if hint else ""
        super().__init__(f"snapshot {path}: {field} mismatch: expected {expected!r}, found {found!r}{detail}")


#: Longest piece of user input an error message repeats.
ECHO_LIMIT = 80


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters, for error messages that quote user input.

    Bounded in work as well as in length: a YAML alias bomb or a huge string must not make the
    error itself take gigabytes, so containers are summarised (reprlib) before being cut."""
    summary = reprlib.Repr()
    summary.maxlevel = 3
    summary.maxdict = summary.maxlist = summary.maxtuple = summary.maxset = summary.maxfrozenset = 4
    summary.maxlong = summary.maxstring = summary.maxother = limit
    short = summary.repr(value)
    return short if len(short) <= limit else short[: limit - 3] + "..."
