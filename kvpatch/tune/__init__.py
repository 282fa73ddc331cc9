"""`kvpatch tune`: search the registry's configuration space for the best config under a memory
target and a quality floor, with the fidelity harness and successive halving (docs/tune.md).

The torch-free parts (objectives, space, frontier) are importable without a model; the search
itself is `kvpatch.tune.search.tune`.
"""

from __future__ import annotations

from .objectives import Floor, MemoryTarget, parse_memory
from .space import FAMILIES, Candidate, Family, Knob, Slot, sample

__all__ = ["FAMILIES", "Candidate", "Family", "Floor", "Knob", "MemoryTarget", "Slot", "parse_memory", "sample"]
