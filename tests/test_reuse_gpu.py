"""Chunk reuse on a CUDA GPU: the write-back runs on the copy stream, off the compute stream, and
the worker thread admits chunks after their copies; neither may change a single logit.

Each round prefills a new prompt (the write-back of its chunks overlaps the decode that follows,
which frees and reallocates the cache's tensors), then a prompt sharing its prefix hits those
chunks: its greedy tokens and last logits must equal the unpatched model's.
"""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.testing import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream and pinned buffers need CUDA")

CHUNK = 128  # configs/prefix_reuse.yaml


def test_side_stream_write_back_then_hits_match_unpatched() -> None:
    model = tiny_model("llama").cuda()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # no special token ids (generate would read a pad id as padding), within the 512 positions
    prompts = [torch.randint(3, vocab, (1, 3 * CHUNK + 17), generator=gen).cuda() for _ in range(6)]

    def generate(ids: torch.Tensor, **kwargs: object) -> object:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, **kwargs)

    with torch.no_grad():
        expected = [generate(p, output_logits=True, return_dict_in_generate=True) for p in prompts]
        handle = kvpatch.apply(model, "prefix_reuse")
        try:
            for prompt, want in zip(prompts, expected):
                generate(prompt[:, : 2 * CHUNK + 5])  # writes its chunks back
                got = generate(prompt, output_logits=True, return_dict_in_generate=True)
                assert handle.reuse.last.reused_tokens == 2 * CHUNK
                assert torch.equal(got.sequences, want.sequences)
                torch.testing.assert_close(got.logits[0], want.logits[0], rtol=1e-4, atol=1e-4)
            handle.reuse.writer.flush()  # re-raises any error the worker met admitting chunks
        finally:
            kvpatch.unpatch(model)
