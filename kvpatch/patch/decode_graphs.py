"""`DecodeGraphs`: a patched model's decode steps replayed as CUDA graphs, under plain `generate`.

An eager decode step launches hundreds of small kernels and runs the model's Python each time;
at small batch that, not memory bandwidth, sets the step time. When every layer of the cache is
a static layer (`kvpatch.cache.GraphStepLayer`: fixed buffers, length kept on the device), a
one-token forward is the same kernels with the same arguments at every step. `DecodeGraphs`
wraps the model's `forward`: the first decode step of a (batch size, inputs) shape runs eagerly
(it warms up kernels and libraries), later ones capture the step once per cache buffers and then
copy the new inputs into the graph's input buffers and replay it. Whatever is not such a step
(prefill, a cache that is not static, outputs the graph does not make) runs eagerly, with the
reason logged once.

What the graph bakes in, and how it stays exact:
- tensors: the inputs are copied into fixed buffers; the attention mask into a 4D boolean
  buffer `[B, 1, 1, capacity]` (the padding mask, False past the valid tokens), which
  transformers passes to attention as it is: for one query per row over keys from position 0 it
  is the causal mask, and no host-side offset of the usual mask building is frozen into the graph;
- host state: capture runs the step's Python without running its kernels, so each layer's host
  mirror is saved before and restored after; a replay advances it as the eager step would;
- buffers: a graph is keyed by the layers' buffer addresses, so a cache that grew (or a new
  request's cache) is captured anew; at most `max_graphs` are kept.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KVPatchCache, graph_step_layers

logger = logging.getLogger("kvpatch")

#: Keywords a captured step may receive (others, when set, make the step run eagerly).
_TENSOR_INPUTS = ("input_ids", "position_ids", "cache_position")
_FLAGS_OFF = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states", "token_type_ids")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    output: Any


class DecodeGraphs:
    """Wraps `model.forward` (until `remove()`) so that static decode steps replay CUDA graphs."""

    def __init__(self, model: torch.nn.Module, cache_kwarg: str, max_graphs: int = 2) -> None:
        self.model, self.cache_kwarg, self.max_graphs = model, cache_kwarg, max_graphs
        self._forward = model.forward
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._warm: set[tuple] = set()
        self._logged: set[str] = set()
        self._known_layers: tuple[weakref.ref, list[Any]] | None = None
        self.replays = 0
        self.captures = 0

        @functools.wraps(self._forward)  # keeps the signature generate and kvpatch inspect
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._call(*args, **kwargs)

        model.forward = forward

    def remove(self) -> None:
        """Give the model its own forward back and free the graphs."""
        if self.model.__dict__.get("forward") is not None:
            del self.model.forward
        self._graphs.clear()

    def stats(self) -> dict[str, int]:
        return {"graph_replays": self.replays, "graph_captures": self.captures, "graphs_kept": len(self._graphs)}

    # -- one forward --------------------------------------------------------------------------------

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        layers, reason = self._step_layers(args, kwargs)
        if layers is None:
            if reason not in self._logged:
                self._logged.add(reason)
                logger.info("kvpatch: decode step runs eagerly (no CUDA graph): %s", reason)
            return self._forward(*args, **kwargs)
        cache: KVPatchCache = kwargs[self.cache_kwarg]
        shape_key = self._shape_key(kwargs)
        if shape_key not in self._warm:  # the first step of this shape warms kernels up, eagerly
            self._warm.add(shape_key)
            return self._forward(**kwargs)
        key = (shape_key, id(cache), tuple(b for layer in layers for b in layer.graph_buffers()))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(kwargs, cache, layers)
            if entry is None:
                return self._forward(**kwargs)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return self._replay(entry, kwargs, cache, layers)

    def _step_layers(self, args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any] | None, str]:
        """The cache's layers if this forward can be a replay, else None and why not."""
        reason = self._ineligible(args, kwargs)
        if reason is not None:
            return None, reason
        cache = kwargs[self.cache_kwarg]
        known = self._known_layers
        if known is not None and known[0]() is cache and len(known[1]) == len(cache.layers):
            layers = known[1]  # the Protocol check per layer is slow enough to matter per step
        else:
            layers = graph_step_layers(cache)
            if layers is None:
                return None, "the cache has layers that are not static (e.g. sliding-window or evicting layers)"
            self._known_layers = (weakref.ref(cache), layers)
        for index, layer in enumerate(layers):
            problem = layer.graph_step_problem(1)
            if problem is not None:
                return None, f"layer {index}: {problem}"
        return layers, ""

    def _ineligible(self, args: tuple, kwargs: dict[str, Any]) -> str | None:
        """Why this forward's arguments cannot be a replay (None: they can)."""
        if args:
            return "positional arguments"
        cache = kwargs.get(self.cache_kwarg)
        if not isinstance(cache, KVPatchCache):
            return "no kvpatch cache passed"
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or ids.device.type != "cuda":
            return "not a one-token CUDA decode step"
        for name in _FLAGS_OFF:
            if kwargs.get(name):
                return f"{name} is set"
        unknown = set(kwargs) - {*_TENSOR_INPUTS, *_FLAGS_OFF, "attention_mask", "logits_to_keep", "use_cache",
                                 "return_dict", self.cache_kwarg}
        if unknown:
            return f"keywords the graph does not take: {', '.join(sorted(unknown))}"
        if not isinstance(kwargs.get("logits_to_keep", 0), int):
            return "logits_to_keep is a tensor"
        return None

    def _shape_key(self, kwargs: dict[str, Any]) -> tuple:
        ids = kwargs["input_ids"]
        present = tuple(name for name in (*_TENSOR_INPUTS, "attention_mask") if kwargs.get(name) is not None)
        return (ids.shape[0], ids.device, present, kwargs.get("logits_to_keep", 0), bool(kwargs.get("use_cache", True)))

    # -- capture and replay -------------------------------------------------------------------------

    def _capture(self, kwargs: dict[str, Any], cache: KVPatchCache, layers: list[Any]) -> _Graph | None:
        inputs = {name: kwargs[name].clone() for name in _TENSOR_INPUTS if kwargs.get(name) is not None}
        ids = kwargs["input_ids"]
        mask = torch.zeros(ids.shape[0], 1, 1, max(layer.capacity for layer in layers), dtype=torch.bool,
                           device=ids.device)
        _copy_mask(mask, kwargs.get("attention_mask"), cache)
        static_kwargs = {**kwargs, **inputs, "attention_mask": mask}
        states = [layer.host_state() for layer in layers]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                output = self._forward(**static_kwargs)
        except Exception as err:  # a step that syncs with the host cannot be captured: run it eagerly
            reason = f"capture failed ({type(err).__name__}: {err})"
            if reason not in self._logged:
                self._logged.add(reason)
                logger.warning("kvpatch: decode step runs eagerly (no CUDA graph): %s", reason)
            return None
        finally:
            for layer, state in zip(layers, states):
                layer.restore_host_state(state)
        self.captures += 1
        return _Graph(graph, inputs, mask, output)

    def _replay(self, entry: _Graph, kwargs: dict[str, Any], cache: KVPatchCache, layers: list[Any]) -> Any:
        for name, buffer in entry.inputs.items():
            buffer.copy_(kwargs[name])
        _copy_mask(entry.mask, kwargs.get("attention_mask"), cache)
        entry.graph.replay()
        for layer in layers:
            layer.advance_host(1)
        self.replays += 1
        output = entry.output
        fields = {name: value for name, value in output.items()}
        fields["logits"] = output.logits.clone()  # the graph overwrites its output at the next replay
        return type(output)(**fields)


def _copy_mask(buffer: torch.Tensor, mask: torch.Tensor | None, cache: KVPatchCache) -> None:
    """The 2D padding `mask` [B, n] (None: all n = stored + 1 tokens) into the front of
    `buffer` [B, 1, 1, capacity], False after it."""
    row = buffer[:, 0, 0]
    if mask is None:
        width = cache.get_seq_length() + 1
        row[:, :width] = True
    else:
        width = mask.shape[-1]
        row[:, :width].copy_(mask)
    row[:, width:] = False

