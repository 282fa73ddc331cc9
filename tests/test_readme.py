"""The README's examples run as written: every ```python block whose first line is
`# runs as written` is executed (in its own namespace, in a temporary directory)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "# runs as written"


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith(MARK)]


def test_the_readme_has_runnable_examples() -> None:
    assert len(runnable_blocks()) >= 3  # API, prefix reuse, RAG


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files an example writes land here
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(runnable_blocks()[index], f"README.md python block {index}", "exec"), namespace)
    assert printed.getvalue().strip(), "an example prints what it shows"
    result = namespace.get("r")
    if result is not None:  # the reuse examples promise that the warmed text is reused
        assert result.kv_reuse_ratio > 0.3, result
