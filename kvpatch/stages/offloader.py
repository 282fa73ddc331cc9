"""`offloader/cpu`: moves K/V to host memory and back.

Device-to-host copies go into pinned buffers on a side CUDA stream, so they overlap the next
kernels instead of stalling the decode step; bringing tensors back first waits for that stream.
On a CPU-only machine the "copy" is a clone. Used by `evictor/budget`: with an offloader in the
config, evicted tokens are kept in host memory (restorable with `cache.restore()`) instead of
dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import Stage, StageParams, register_stage


@register_stage("offloader", "cpu")
class CpuOffloader(Stage):
    """Host-memory offload of K/V with pinned buffers and an asynchronous side stream."""

    class Params(StageParams):
        #: Page-locked host buffers (needed for truly asynchronous copies; costs host RAM that
        #: the OS cannot swap).
        pin_memory: bool = True

    params: Params

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.bytes_offloaded = 0
        self.bytes_restored = 0

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor`; asynchronous for CUDA tensors (see `to_device`)."""
        self.bytes_offloaded += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            return tensor.clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.params.pin_memory)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # keep the source alive until the copy has run
        return host

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` (from `to_host`) on `device`, after every pending host copy has finished."""
        self.bytes_restored += tensor.numel() * tensor.element_size()
        if device.type == "cuda":
            if device in self._streams:
                self._streams[device].synchronize()
            return tensor.to(device, non_blocking=self.params.pin_memory)
        return tensor.to(device)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def cleanup(self) -> None:
        """Wait for pending copies and release the side streams."""
        for stream in self._streams.values():
            stream.synchronize()
        self._streams.clear()

    def __enter__(self) -> "CpuOffloader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def stats(self) -> dict[str, Any]:
        return {"bytes_offloaded": self.bytes_offloaded, "bytes_restored": self.bytes_restored}
