"""`offloader/cpu`: K/V to host memory (or memory-mapped files) and back (kvpatch/stages/offloader.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from ..registry import StageParams, declare_stage


class CpuOffloaderParams(StageParams):
    #: Page-locked host buffers (needed for truly asynchronous copies; costs host RAM that
    #: the OS cannot swap).
    pin_memory: bool = True
    #: `memory`: host RAM (pinned if `pin_memory`); `mmap`: memory-mapped files.
    backing: Literal["memory", "mmap"] = "memory"
    #: Where the mmap files go (a fresh temporary directory inside it); default: the
    #: system temporary directory.
    mmap_dir: str | None = None

    @field_validator("mmap_dir")
    @classmethod
    def _directory(cls, value: str | None) -> str | None:
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError("expected a directory (or a path to create one at), found an existing non-directory")
        return value


declare_stage("offloader", "cpu", "kvpatch.stages.offloader:CpuOffloader", CpuOffloaderParams)
