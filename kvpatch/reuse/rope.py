"""Moving cached keys to another position, for chunks reused away from where they were computed.

Cached keys are stored after the rotary embedding. RoPE at position p + d is RoPE at p followed by
a rotation by d, so a chunk computed at `start` is moved to `new_start` by rotating its keys by
`new_start - start`, using the model's own rotary module (any rope scaling it applies). Values
carry no position and are left alone. Families without rotary embeddings (GPT-2's learned
positions) cannot be moved: `KeyRotator.for_model` says so with a reason.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import UnsupportedModelError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class KeyRotator:
    """Re-rotates the keys of a `[layers, 2, heads, tokens, dim]` chunk payload."""

    def __init__(self, rotary: torch.nn.Module, layer_types: list[str] | None) -> None:
        self.rotary = rotary
        self.layer_types = layer_types
        self._per_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> KeyRotator:
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None:
            raise UnsupportedModelError(
                f"{model.config.model_type}: no rotary embedding (base_model.rotary_emb), so cached "
                "keys cannot be moved to another position; approximate chunk reuse needs RoPE"
            )
        config = model.config.get_text_config(decoder=True)
        return cls(rotary, getattr(config, "layer_types", None))

    def _cos_sin(self, delta: int, like: torch.Tensor, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of a rotation by `delta`, with the rotary module's attention scaling divided
        out (cos(0) carries exactly that scaling)."""
        positions = torch.tensor([[0, delta]], device=like.device)
        kwargs = {"layer_type": layer_type} if self._per_layer_type else {}
        cos, sin = self.rotary(like, positions, **kwargs)
        scale = cos[0, 0]
        return (cos[0, 1] / scale).to(like.dtype), (sin[0, 1] / scale).to(like.dtype)

    def rotate(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        """A copy of `kv` whose keys sit `delta` positions later (earlier when negative)."""
        if delta == 0:
            return kv
        out = kv.clone()
        cache: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(kv.shape[0]):
            layer_type = self.layer_types[layer] if (self._per_layer_type and self.layer_types) else None
            if layer_type not in cache:
                cache[layer_type] = self._cos_sin(delta, kv, layer_type)
            cos, sin = cache[layer_type]
            rot = cos.shape[-1]
            keys = kv[layer, 0, ..., :rot]
            out[layer, 0, ..., :rot] = keys * cos + _rotate_half(keys) * sin
        return out
