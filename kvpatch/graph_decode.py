"""`CudaGraphDecoder`: greedy decode in which every step is one CUDA-graph replay.

An eager decode step of a transformers model launches hundreds of small kernels and runs the
model's Python each time; at small batch that, not memory bandwidth, sets the step time
(../shared/notes/gpu-anchors.md: an 8B model's eager step is launch-bound). If the cache's decode
step has fixed shapes and keeps its state on the device (`storage/quantized` with
`capacity_tokens`, or transformers' `StaticCache`), the whole step (forward, argmax, feeding the
token back, advancing the position) is captured once and replayed: no Python, no host sync per
token. The same step runs eagerly for the warm-up, so graph and eager decode can be compared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .compat import cache_kwarg


class CudaGraphDecoder:
    """Greedy decode of `model` over an already prefilled `cache`, one graph replay per token.

    The cache must be static (see module docstring); a cache that changes shapes or syncs with the
    host fails at capture time with torch's error, it never replays wrong kernels silently, except
    for host-side state, which the decoder re-reads from the layers afterwards (`sync_counts`).
    """

    def __init__(self, model: Any, cache: Any, warmup_steps: int = 2) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphDecoder needs a CUDA device")
        self.model, self.cache, self.warmup_steps = model, cache, max(1, warmup_steps)
        self._cache_arg = {cache_kwarg(model): cache}
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step_fn(self, ids: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                 index: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            logits = self.model(input_ids=ids, position_ids=positions, use_cache=True, **self._cache_arg).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.index_copy_(1, index, nxt)
            ids.copy_(nxt)
            positions.add_(1)
            index.add_(1).remainder_(tokens.shape[1])

        return step

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, prefill_chunk: int = 4096,
                 use_graph: bool = True) -> torch.Tensor:
        """Prefill all but the last prompt token into the cache (in chunks), then `decode`:
        the greedy continuation `[B, max_new_tokens]` (unpadded prompts of equal length)."""
        prompt = input_ids.shape[1]
        for begin in range(0, prompt - 1, prefill_chunk):
            self.model(input_ids=input_ids[:, begin : min(begin + prefill_chunk, prompt - 1)], use_cache=True,
                       logits_to_keep=1, **self._cache_arg)
        return self.decode(input_ids[:, -1], prompt - 1, max_new_tokens, use_graph=use_graph)

    @torch.no_grad()
    def decode(self, last_tokens: torch.Tensor, position: int, steps: int, use_graph: bool = True) -> torch.Tensor:
        """Greedy tokens `[B, steps]` after a prefilled cache: `last_tokens` `[B]` is the prompt's
        last token (not in the cache yet: it is the first decode input), at `position`. With
        `use_graph`, the first `warmup_steps` run eagerly, then one step is captured and replayed;
        `self.graph.replay()` afterwards decodes further (token columns wrap around)."""
        batch, device = last_tokens.shape[0], last_tokens.device
        ids = last_tokens.view(batch, 1).clone()
        positions = torch.full((batch, 1), position, dtype=torch.long, device=device)
        tokens = torch.zeros(batch, steps, dtype=torch.long, device=device)
        #: device index of the next token column; `replay` wraps it so extra replays stay in bounds
        self.index = index = torch.zeros(1, dtype=torch.long, device=device)
        step = self._step_fn(ids, positions, tokens, index)
        eager = steps if not use_graph else min(self.warmup_steps, steps)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(eager):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        if steps > eager:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                step()
            for _ in range(steps - eager):
                self.graph.replay()
        for layer in getattr(self.cache, "layers", []):
            if hasattr(layer, "sync_counts"):
                layer.sync_counts()
        return tokens
