"""Whether Triton kernels can run on given tensors, and why not when they cannot.

A config that asks for `kernels: {attention: triton}` falls back to the torch kernels where
Triton cannot run (no Triton, tensors on the CPU): the reason is logged once per distinct reason,
so a fallback is never silent, and the results are the torch path's.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger("kvpatch")
_logged: set[str] = set()
#: Looked up once: torch.compile'd code must not call importlib.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (read by Triton when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(tensor: torch.Tensor) -> str | None:
    """None if Triton kernels can run on `tensor`'s device, else why not."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreting()):
        return None
    return f"tensors are on {tensor.device.type}; Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"


def log_fallback(reason: str) -> None:
    """Log, once per reason, that the torch kernels run instead of Triton's."""
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("kvpatch: kernels.attention=triton falls back to torch: %s", reason)
