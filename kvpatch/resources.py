"""Where the bundled YAML files live, in a source checkout and in an installed wheel.

The repository keeps `configs/` and `patches/` at its root (where users browse them); the wheel
build copies them to `kvpatch/_bundled/`. This module is the one place that knows both spots.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """Directory of a bundled resource folder (`configs` or `patches`)."""
    installed = _PACKAGE_DIR / "_bundled" / name
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"kvpatch's bundled '{name}' folder was not found (looked in {installed} and {checkout}); "
        "the installation is incomplete: reinstall kvpatch."
    )
