"""Every kvpatch module imports on its own, whichever one a user (or a test file) imports first.

`import kvpatch` is lazy (PEP 562), so nothing hides an import cycle by loading modules in a
lucky order: a module that needs another one part-way through its own import fails here.
"""

from __future__ import annotations

import subprocess
import sys

#: Run in a fresh interpreter; torch and transformers stay loaded (they are not ours), and every
#: kvpatch module is dropped from sys.modules before the next one is imported.
SCRIPT = """
import importlib, pkgutil, sys
import torch, transformers
import kvpatch
names = sorted(m.name for m in pkgutil.walk_packages(kvpatch.__path__, "kvpatch.")
               if not m.name.endswith("__main__"))
for name in names:
    for loaded in [m for m in sys.modules if m == "kvpatch" or m.startswith("kvpatch.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        print(f"FAILED {name}: {type(err).__name__}: {err}")
print(f"IMPORTED {len(names)}")
"""


def test_every_module_imports_alone() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    count = int(done.stdout.split("IMPORTED ")[1])
    assert count > 50  # the walk found the package's modules


def test_import_kvpatch_loads_no_torch() -> None:
    script = "import sys, kvpatch; print(kvpatch.__version__, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0.1.0", "False"], done.stderr


def test_public_names_resolve() -> None:
    import kvpatch

    for name in kvpatch.__all__:
        assert getattr(kvpatch, name) is not None, name
