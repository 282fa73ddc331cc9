"""`storage/quantized`: quantizer codes plus a full-precision recent window
(kvpatch/stages/storage_quantized.py)."""

from __future__ import annotations

from ..params import Count, Size
from ..registry import StageParams, declare_stage


class QuantizedStorageParams(StageParams):
    #: Most recent tokens kept in full precision (KIVI uses 32-128). Tokens beyond it are
    #: quantized in whole blocks of the quantizer's group size.
    residual_length: Count = 128
    #: First tokens of the sequence kept in full precision (attention sinks).
    sink_tokens: Count = 0
    #: Decode the codes through torch.compile (6-10x faster decode on a GPU; the first calls
    #: pay for compiling).
    compile_decode: bool = False
    #: Preallocate buffers for this many tokens per sequence and keep the layer's counters on
    #: the device: decode steps then have fixed shapes and never sync with the host, so they
    #: can be captured in a CUDA graph (`kvpatch.CudaGraphDecoder`). None: grow as needed.
    capacity_tokens: Size | None = None


declare_stage("storage", "quantized", "kvpatch.stages.storage_quantized:QuantizedStorage", QuantizedStorageParams,
              lossless=False, requires=("quantizer",), builds_layers=True)
