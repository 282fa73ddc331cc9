"""Exception types. Every error kvpatch raises for bad input is one of these, so callers can catch
them as a group and scripts get one readable paragraph instead of a traceback through pydantic."""

from __future__ import annotations


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
