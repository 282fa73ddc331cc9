"""The constrained number types that stage params and configs are built from.

One place for what a count, a size or a fraction may be, so that every stage rejects the same
bad values the same way: `true` is not a number (strict: no bool, no numeric strings), counts are
never negative, sizes never zero, fractions stay in [0, 1], floats are finite.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, Strict

#: Tokens, iterations, layers: 0 or more.
Count = Annotated[int, Strict(), Field(ge=0)]
#: Sizes, windows, periods: 1 or more.
Size = Annotated[int, Strict(), Field(ge=1)]
#: A token id (0 or more; the model's vocabulary bounds it at apply time).
TokenId = Count
#: A random seed: what `torch.Generator.manual_seed` accepts without wrapping.
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**63)]
#: A share in [0, 1].
Fraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
#: A share in (0, 1]: zero would keep nothing.
PositiveFraction = Annotated[float, Strict(), Field(gt=0.0, le=1.0)]
#: A finite weight of 0 or more.
Weight = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]


def power_of_two(value: int) -> int:
    """`value` if it is a power-of-two int >= 1 (a hash table's capacity); else a clear ValueError.
    `hashing.fibonacci.table_bits` applies the same rule there: that module stays free of imports
    (it is loaded on its own to compare hashes across processes)."""
    if type(value) is not int or value < 1 or value & (value - 1):
        raise ValueError(f"table_size must be a power-of-two int >= 1, got {value!r}")
    return value


#: A hash table's capacity: a power of two, 1 or more.
PowerOfTwo = Annotated[int, AfterValidator(power_of_two)]
