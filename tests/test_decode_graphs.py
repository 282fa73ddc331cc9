"""CUDA-graph decode under plain `generate` (kvpatch/patch/decode_graphs.py), on a CUDA GPU.

The replayed steps must give what the same config gives eagerly: identical greedy tokens on a
float32 model (random-init bf16 models tie too often for token equality to mean anything), for
padded batches, across a buffer that grows mid-generation (a new capture), for the static dense
and the static KIVI layers. The CPU side of the static layers is in tests/test_static_dense.py
and tests/test_static_layer.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kvpatch
from kvpatch.testing import prompt_ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _generate(config: str | dict, graphs: bool, new_tokens: int = 40, **kwargs):
    config = copy.deepcopy(kvpatch.load_config(config).model_dump())
    config["compile"]["cuda_graphs"] = graphs
    model = tiny_model("llama").cuda()
    handle = kvpatch.apply(model, config)
    ids = prompt_ids(batch=3, length=24).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out, handle


def _kivi_static() -> dict:
    config = kvpatch.load_config("kivi4_triton").model_dump()
    config["stages"][0]["params"]["group_size"] = 8  # the tiny model's head_dim is 16
    config["stages"][1]["params"].update(capacity_tokens=256, residual_length=32)
    return config


def _compiled_graphs() -> dict:
    config = kvpatch.load_config("default_graphs").model_dump()
    config["compile"].update(enabled=True, mode="default")
    return config


@pytest.mark.parametrize("config", ["default_graphs", "kivi", "compiled"])
def test_graph_decode_equals_eager_decode(config: str) -> None:
    source = {"kivi": _kivi_static, "compiled": _compiled_graphs}.get(config, lambda: config)()
    eager, _ = _generate(source, graphs=False, do_sample=False)
    graphed, handle = _generate(source, graphs=True, do_sample=False)
    stats = handle.stats()["decode_graphs"]
    assert stats["graph_captures"] >= 1 and stats["graph_replays"] >= 35
    assert torch.equal(graphed.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(graphed.logits), torch.stack(eager.logits), atol=1e-3, rtol=1e-3)


def test_graph_decode_matches_the_unpatched_model() -> None:
    """The lossless graph config against transformers' own eager decode of the same model."""
    model = tiny_model("llama").cuda()
    ids = prompt_ids(batch=2, length=24).cuda()
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    handle = kvpatch.apply(model, "default_graphs")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert handle.stats()["decode_graphs"]["graph_replays"] >= 25
    assert torch.equal(out, reference)


def test_a_buffer_that_grows_is_captured_again() -> None:
    config = kvpatch.load_config("default_graphs").model_dump()
    config["stages"][0]["params"]["capacity_tokens"] = 48  # 24 prompt tokens: full after 24 steps
    eager, _ = _generate(config, graphs=False, new_tokens=60, do_sample=False)
    graphed, handle = _generate(config, graphs=True, new_tokens=60, do_sample=False)
    assert handle.stats()["decode_graphs"]["graph_captures"] >= 2
    assert torch.equal(graphed.sequences, eager.sequences)


def test_sampling_replays_the_same_distribution() -> None:
    outs = []
    for graphs in (False, True):
        torch.manual_seed(3)
        outs.append(_generate("default_graphs", graphs=graphs, do_sample=True, top_k=50)[0].sequences)
    assert torch.equal(outs[0], outs[1])
