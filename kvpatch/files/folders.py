"""A directory of snapshots: listing them (never temp files) and garbage collection.

Writers leave `.<name>.safetensors.<host>-<pid>-<random>.tmp` files only if they die mid-write.
`gc` removes those whose writer is gone (same host, pid no longer running) or that are older
than a grace period (another host, or a pid reused), and optionally old snapshots.

Only regular files are listed (checked with `lstat`, never opened): a directory, FIFO, device or
symlink that happens to carry a snapshot or temp name is neither listed nor removed.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .safetensors_io import SUFFIX, temp_writer

#: A temp file this old is abandoned whoever wrote it (no snapshot write takes a day).
DEFAULT_TEMP_GRACE_S = 24 * 3600.0


def regular_files(directory: str | os.PathLike[str]) -> list[tuple[Path, os.stat_result]]:
    """(path, lstat) of every regular file directly in `directory` (no symlinks, no special files)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((Path(entry.path), info))
    return found


def list_snapshots(directory: str | os.PathLike[str]) -> list[Path]:
    """Snapshot files in `directory`, newest first (hidden and temp files excluded)."""
    files = [(p, info) for p, info in regular_files(directory) if p.suffix == SUFFIX and not p.name.startswith(".")]
    return [p for p, _ in sorted(files, key=lambda f: (f[1].st_mtime, f[0].name), reverse=True)]


def list_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Temp files that snapshot writers create in `directory`."""
    return sorted(p for p, _ in regular_files(directory) if temp_writer(p) is not None)


def is_stale_temp(path: Path, grace_s: float = DEFAULT_TEMP_GRACE_S, now: float | None = None) -> bool:
    """Its writer died (same host, pid gone) or it is older than `grace_s` seconds."""
    host, pid = temp_writer(path) or ("", 0)
    if host == socket.gethostname() and not _running(pid):
        return True
    try:
        return (now or time.time()) - path.lstat().st_mtime > grace_s
    except FileNotFoundError:  # renamed into place or removed meanwhile
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class GcReport:
    removed_temp_files: list[Path] = field(default_factory=list)
    removed_snapshots: list[Path] = field(default_factory=list)


def gc(directory: str | os.PathLike[str], keep: int | None = None, older_than_s: float | None = None,
       temp_grace_s: float = DEFAULT_TEMP_GRACE_S) -> GcReport:
    """Remove abandoned temp files, then snapshots beyond the newest `keep` or older than
    `older_than_s` (by modification time)."""
    report = GcReport()
    now = time.time()
    for temp in list_temp_files(directory):
        if is_stale_temp(temp, temp_grace_s, now):
            temp.unlink(missing_ok=True)
            report.removed_temp_files.append(temp)
    snapshots = list_snapshots(directory)
    doomed = snapshots[keep:] if keep is not None else []
    if older_than_s is not None:
        doomed += [p for p in snapshots if now - _mtime(p) > older_than_s and p not in doomed]
    for path in doomed:
        path.unlink(missing_ok=True)
        report.removed_snapshots.append(path)
    return report


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")  # removed meanwhile: nothing to collect
