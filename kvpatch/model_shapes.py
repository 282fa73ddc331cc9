"""The shapes of a model that stage params must fit (head_dim, layers, vocabulary).

Read once from the model config at `apply` time, so each stage checks itself against plain numbers
(`Stage.model_problems`) instead of each one digging through transformers' config attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShapes:
    """What the K/V of every layer of one model looks like, and the ids it can read."""

    model_type: str
    head_dim: int
    kv_heads: int
    num_layers: int
    vocab_size: int

    @classmethod
    def of(cls, model_config: Any) -> "ModelShapes":
        config = model_config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(str(getattr(model_config, "model_type", "?")), int(head_dim), int(heads),
                   int(config.num_hidden_layers), int(config.vocab_size))


def misfit(field: str, value: object, model_field: str, model_value: object, expected: str) -> str:
    """One problem line of `Stage.model_problems`, the same shape for every stage."""
    return f"params.{field} is {value!r} but the model's {model_field} is {model_value!r}: expected {expected}"


def divisors(n: int) -> list[int]:
    """The divisors of `n`, for 'expected one of ...' hints."""
    return [d for d in range(1, n + 1) if n % d == 0]
