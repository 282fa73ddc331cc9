"""`index/fibonacci` and `index/dict`: chunk key -> store slot (kvpatch/stages/index.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..params import PositiveFraction, PowerOfTwo
from ..registry import StageParams, declare_stage


class FibonacciIndexParams(StageParams):
    initial_capacity: PowerOfTwo = 1024
    max_load_factor: Annotated[PositiveFraction, Field(lt=1.0)] = 0.75


declare_stage("index", "fibonacci", "kvpatch.stages.index:FibonacciIndex", FibonacciIndexParams)
declare_stage("index", "dict", "kvpatch.stages.index:DictIndex")
