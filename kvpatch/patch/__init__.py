"""The patch layer: attention function, cache, apply/unpatch."""

from .apply import PatchHandle, apply, get_handle, unpatch
from ..cache import KVPatchCache

__all__ = ["KVPatchCache", "PatchHandle", "apply", "get_handle", "unpatch"]
