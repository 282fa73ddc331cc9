"""The constrained number types that stage params and configs are built from.

One place for what a count, a size or a fraction may be, so that every stage rejects the same
bad values the same way: `true` is not a number (strict: no bool, no numeric strings), counts are
never negative, sizes never zero, fractions stay in [0, 1], floats are finite.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict

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
