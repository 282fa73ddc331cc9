"""An offline text corpus built from the Python sources already installed on the machine.

No dataset hub is reachable where kvpatch trains its reference model, so the corpus is the
`.py` files of the standard library (and, optionally, of site-packages). The rules are chosen so
that the same Python installation always yields the same corpus, file for file and byte for byte:

* files are listed root by root (all of `stdlib/...`, then `site-packages/...`), each root
  sorted by relative path;
* directories named `test`, `tests`, `idle_test`, `__pycache__`, `site-packages` and
  `dist-packages` are skipped inside the stdlib walk (test suites hold large generated data and
  odd encodings; site-packages is its own, optional, source);
* files over `max_file_bytes` (generated tables) and files that are not valid UTF-8 are skipped;
* the corpus is the longest prefix of that sorted list whose on-disk size fits `max_bytes`;
* each file goes to the validation split when the SHA-256 of its relative path falls under
  `val_fraction` (not Python's `hash()`, which is salted per process).

Different Python versions have different standard libraries, so corpora differ across machines;
that is why the trained model ships its own `heldout.txt` for perplexity.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)
DEFAULT_MAX_FILE_BYTES = 512 * 1024
DEFAULT_VAL_FRACTION = 0.05
HELDOUT_DEFAULT_BYTES = 160 * 1024
FILE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: its stable relative path (the split key), where it is, its split."""

    relpath: str
    path: Path
    size: int
    split: str  # "train" or "validation"


@dataclass
class Corpus:
    """File texts of both splits, in the deterministic corpus order."""

    files: list[SourceFile]
    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.train + self.validation)

    def fingerprint(self) -> str:
        """SHA-256 over the relative paths and sizes: identifies the corpus in a report."""
        return fingerprint(self.files)


def split_of(relpath: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """Deterministic split of a file, from the SHA-256 of its relative path."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if unit < val_fraction else "train"


def fingerprint(files: Iterable[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relpath}\0{f.size}\n".encode())
    return h.hexdigest()


def source_roots(include_site_packages: bool = False) -> list[tuple[str, Path]]:
    """(label, directory) pairs to walk, in corpus order."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    if include_site_packages:
        roots.append(("site-packages", Path(paths["purelib"])))
    return roots


def _walk_py(root: Path, skip_dirs: frozenset[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(".py"):
                yield Path(dirpath) / name


def list_sources(
    include_site_packages: bool = False,
    max_bytes: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    roots: list[tuple[str, Path]] | None = None,
) -> list[SourceFile]:
    """The corpus files in corpus order, capped at `max_bytes` of on-disk size (a prefix, so the
    stdlib, which every machine has, is always taken first)."""
    candidates: list[SourceFile] = []
    for label, root in roots if roots is not None else source_roots(include_site_packages):
        # Test suites are skipped everywhere; package dirs only inside the stdlib walk.
        skip = SKIP_DIRS if label == "stdlib" else frozenset({"test", "tests", "__pycache__"})
        found = []
        for path in _walk_py(root, skip):
            size = path.stat().st_size
            if size == 0 or size > max_file_bytes:
                continue
            rel = f"{label}/{path.relative_to(root).as_posix()}"
            found.append(SourceFile(rel, path, size, split_of(rel, val_fraction)))
        candidates.extend(sorted(found, key=lambda f: f.relpath))  # roots keep their order
    if max_bytes is None:
        return candidates
    chosen, total = [], 0
    for f in candidates:
        if total + f.size > max_bytes:
            break
        chosen.append(f)
        total += f.size
    return chosen


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def build_corpus(
    include_site_packages: bool = False,
    max_bytes: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    roots: list[tuple[str, Path]] | None = None,
) -> Corpus:
    """Read the corpus files into train/validation texts (unreadable files are dropped)."""
    files = list_sources(include_site_packages, max_bytes, max_file_bytes, val_fraction, roots)
    corpus = Corpus(files=[])
    for f in files:
        text = _read_utf8(f.path)
        if text is None or not text.strip():
            continue
        corpus.files.append(f)
        (corpus.validation if f.split == "validation" else corpus.train).append(text)
    return corpus


def heldout_text(validation_texts: Iterable[str], max_bytes: int = HELDOUT_DEFAULT_BYTES) -> str:
    """A fixed-size excerpt of the validation split, shipped next to the model for perplexity.

    Whole files are joined in corpus order; the last one is cut at a line end so the excerpt
    stays under `max_bytes` of UTF-8.
    """
    parts: list[str] = []
    used = 0
    for text in validation_texts:
        need = len(text.encode("utf-8")) + len(FILE_SEPARATOR)
        if used + need <= max_bytes:
            parts.append(text)
            used += need
            continue
        room = max_bytes - used
        if room > 0:
            cut = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            cut = cut[: cut.rfind("\n") + 1]
            if cut:
                parts.append(cut)
        break
    return FILE_SEPARATOR.join(parts)
