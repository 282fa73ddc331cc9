"""A `KVPatchCache` <-> a flat dict of named tensors plus one `LayerRecord` per layer.

Each layer class kvpatch builds has one kind here: "dense" (`DynamicLayer`, and `StaticDenseLayer`,
whose `keys/values` are views of its valid tokens and which re-arms its buffer from assigned K/V), "sliding"
(`DynamicSlidingWindowLayer`, which also needs its cumulative token count) and "quantized"
(`QuantizedLayer`: residual, attention sinks and codes). Tensors are stored exactly as the layer
holds them, so a restored cache is bit-identical and continues generation exactly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import SnapshotError
from ..cache import KVPatchCache
from ..quant.codes import Codes
from ..stages.storage_dense_static import StaticDenseLayer
from ..stages.storage_quantized import QuantizedLayer
from .format import CodesRecord, LayerKind, LayerRecord, TensorRecord, layer_tensor_name
from ..files.safetensors_io import dtype_name

ROLES = ("key", "value")


def layer_kind(layer: CacheLayerMixin) -> LayerKind:
    """The snapshot kind of a cache layer; other layer classes cannot be snapshotted (yet)."""
    if isinstance(layer, QuantizedLayer):
        return "quantized"
    if isinstance(layer, DynamicSlidingWindowLayer):
        return "sliding"
    if type(layer) is DynamicLayer or type(layer) is StaticDenseLayer:
        return "dense"
    raise SnapshotError(f"cannot snapshot a {type(layer).__name__} cache layer (kinds: dense, sliding, quantized)")


def codes_tensor_name(role: str, name: str) -> str:
    return f"codes.{role}.{name}"


def encode_cache(cache: KVPatchCache) -> tuple[list[LayerRecord], dict[str, torch.Tensor]]:
    """Records and contiguous CPU copies of every layer's tensors, named `layers.{i}.{name}`."""
    records, tensors = [], {}
    for i, layer in enumerate(cache.layers):
        record, local = encode_layer(layer)
        records.append(record)
        tensors.update({layer_tensor_name(i, name): t for name, t in local.items()})
    return records, tensors


def encode_layer(layer: CacheLayerMixin) -> tuple[LayerRecord, dict[str, torch.Tensor]]:
    kind = layer_kind(layer)
    if isinstance(layer, QuantizedLayer):
        layer.materialize()
    window = getattr(layer, "sliding_window", None)
    if not layer.is_initialized or layer.get_seq_length() == 0:
        return LayerRecord(kind=kind, sliding_window=window, seq_length=0, residual_tokens=0, tensors={}), {}
    tensors = {"keys": layer.keys, "values": layer.values}
    extra: dict[str, object] = {}
    if isinstance(layer, QuantizedLayer):
        if layer.sink_keys is not None:
            tensors.update({"sink.keys": layer.sink_keys, "sink.values": layer.sink_values})
        for role, codes in zip(ROLES, (layer.key_codes, layer.value_codes)):
            if codes is not None:
                tensors.update({codes_tensor_name(role, n): t for n, t in codes.tensors.items()})
                extra[f"{role}_codes"] = CodesRecord(block_tokens=codes.block_tokens, dim=codes.dim, names=list(codes.tensors))
        extra.update(sink_tokens=layer.sink_length, quantized_tokens=layer.quantized_tokens)
    # copy=True: a view (sliding windows, cropped residuals) must not drag its whole buffer along.
    copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    record = LayerRecord(
        kind=kind,
        sliding_window=window,
        seq_length=layer.get_seq_length(),
        residual_tokens=int(layer.keys.shape[-2]),
        tensors={n: TensorRecord(dtype=dtype_name(t.dtype), shape=list(t.shape)) for n, t in copies.items()},
        **extra,
    )
    return record, copies


def restore_cache(cache: KVPatchCache, records: list[LayerRecord], tensors: dict[str, torch.Tensor],
                  device: torch.device) -> None:
    """Fill the empty layers of `cache` from records already checked against it (`checks`)."""
    for i, (layer, record) in enumerate(zip(cache.layers, records)):
        local = {name: tensors[layer_tensor_name(i, name)].to(device) for name in record.tensors}
        restore_layer(layer, record, local)


def restore_layer(layer: CacheLayerMixin, record: LayerRecord, tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        return
    layer.lazy_initialization(tensors["keys"], tensors["values"])
    layer.keys, layer.values = tensors["keys"], tensors["values"]
    if record.kind == "sliding":
        layer.cumulative_length = record.seq_length
    if record.kind == "quantized":
        if "sink.keys" in tensors:
            layer.sink_keys, layer.sink_values = tensors["sink.keys"], tensors["sink.values"]
        layer.key_codes = _codes(tensors, "key", record.key_codes)
        layer.value_codes = _codes(tensors, "value", record.value_codes)


def _codes(tensors: dict[str, torch.Tensor], role: str, record: CodesRecord | None) -> Codes | None:
    if record is None:
        return None
    return Codes({n: tensors[codes_tensor_name(role, n)] for n in record.names}, record.block_tokens, record.dim)
