"""Batches as servers send them: left-padded prompts of unequal lengths under chunk reuse. Each
row matches its own prefix and reports its own reuse; padding never enters a chunk; exact reuse
reproduces the unpatched model on the same padded batch, and approximate reuse gives each row
what it gets alone."""

from __future__ import annotations

import pytest
import torch

import kvpatch
from kvpatch.testing import tiny_model, tiny_tokenizer
from test_reuse import CHUNK, reuse_config, tokens

PAD = 2  # outside tokens()'s range: a pad id that reached a chunk would show


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` ids and mask of 1-D rows, left-padded as `tokenizer(..., padding=True)` does."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the stacked logits of every step."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def reused(handle: kvpatch.PatchHandle) -> list[int]:
    return [row.reused_tokens for row in handle.reuse.last.rows]


SYSTEM = tokens(20, 1)[0]  # stored as chunks [0, 8), [8, 16) and the tail [16, 20)
ROWS = [torch.cat([SYSTEM, tokens(7, 2)[0]]),  # 27 tokens, shares the two whole chunks
        torch.cat([SYSTEM[:17], tokens(3, 3)[0]]),  # 20 tokens, shares the two whole chunks
        tokens(11, 4)[0]]  # 11 tokens, no hit


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_left_padded_prefix_reuse_is_exact_per_row(family: str) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    handle = kvpatch.apply(model, reuse_config())
    with torch.no_grad():
        model(input_ids=SYSTEM[None], logits_to_keep=1)
    ids, mask = left_padded(ROWS)
    expected_tokens, expected_logits = generate(reference, ids, mask)
    tokens_, logits = generate(model, ids, mask)
    assert torch.equal(tokens_, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    # rows could reuse 16, 16, 0; every row computes the longest unreused part (11 tokens, row 2),
    # so row 1 (20 tokens) reuses only its first 9 and computes the rest with the others
    assert reused(handle) == [16, 9, 0]
    assert [row.prompt_tokens for row in handle.reuse.last.rows] == [27, 20, 11]  # padding not counted
    assert handle.reuse.last.row_reuse_ratios == [16 / 27, 9 / 20, 0.0]
    # every row's new chunks were stored: now each hits all but its last token
    tokens_, logits = generate(model, ids, mask)
    assert torch.equal(tokens_, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    assert reused(handle) == [len(row) - 1 for row in ROWS]


def test_beam_search_and_sampling_over_a_padded_batch_reuse_per_row_and_match_unpatched() -> None:
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config())
    ids, mask = left_padded(ROWS)
    generate(model, ids, mask)  # stores every row's chunks
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    with torch.no_grad():
        beams = model.generate(ids, num_beams=2, do_sample=False, **kwargs)
        assert reused(handle) == [len(row) - 1 for row in ROWS for _ in range(2)]  # each beam row its own
        assert torch.equal(beams, reference.generate(ids, num_beams=2, do_sample=False, **kwargs))
        torch.manual_seed(5)
        sampled = model.generate(ids, do_sample=True, **kwargs)
        torch.manual_seed(5)
        assert torch.equal(sampled, reference.generate(ids, do_sample=True, **kwargs))


def test_chunks_of_a_padded_batch_hold_no_padding_and_serve_each_row_alone() -> None:
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config())
    generate(model, *left_padded(ROWS))
    chunks = list(handle.reuse.store.iter_chunks())
    assert len(chunks) == 4 + 1 + 2  # rows 0 and 1 share their first two chunks
    for chunk in chunks:  # each holds a row's real tokens at their positions in that row
        end = chunk.start + chunk.num_tokens
        assert any(torch.equal(row[chunk.start:end], chunk.token_ids) for row in ROWS), chunk.start
    for row in ROWS:
        ids = row[None]
        alone, expected = generate(model, ids, torch.ones_like(ids)), generate(reference, ids, torch.ones_like(ids))
        assert torch.equal(alone[0], expected[0])
        torch.testing.assert_close(alone[1], expected[1], atol=1e-5, rtol=0)
        assert reused(handle) == [len(row) - 1]


def test_batches_without_a_left_padded_layout_are_neither_reused_nor_stored() -> None:
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config())
    ids, mask = left_padded(ROWS)
    right = torch.stack([torch.roll(row, -int((1 - m).sum())) for row, m in zip(ids, mask)])
    right_mask = torch.stack([torch.roll(m, -int((1 - m).sum())) for m in mask])
    cases = [dict(attention_mask=mask),  # left-padded, but no position ids: the model numbers rows by column
             dict(attention_mask=right_mask, input_ids=right),  # right padding
             dict(attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))]
    for _ in range(2):
        for case in cases:
            kwargs = {"input_ids": ids, "logits_to_keep": 1, **case}
            with torch.no_grad():
                torch.testing.assert_close(model(**kwargs).logits, reference(**kwargs).logits, atol=1e-5, rtol=0)
            assert handle.reuse.last.reused_tokens == 0
    assert handle.reuse.store.stats()["puts"] == 0
    assert [row.prompt_tokens for row in handle.reuse.last.rows] == [27, 20, 11]


# -- approximate reuse (rag) -----------------------------------------------------------------------

DOC_A, DOC_B = tokens(16, 11)[0], tokens(16, 12)[0]


def rag_rows(query_lengths: tuple[int, int, int]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Row 0: both documents swapped (doc_a moved: approximate), row 1: doc_a first (exact),
    row 2: a query alone (no hit); with each row's segment starts."""
    q0, q1, q2 = (tokens(n, 20 + i)[0] for i, n in enumerate(query_lengths))
    rows = [torch.cat([DOC_B, DOC_A, q0]), torch.cat([DOC_A, q1]), q2]
    return rows, [[16, 32], [16], []]


def warmed_rag_model(family: str, recompute: str, **params: object) -> tuple[torch.nn.Module, kvpatch.PatchHandle]:
    model = tiny_model(family)
    handle = kvpatch.apply(model, reuse_config("approximate", recompute, **params))
    with torch.no_grad():
        for doc in (DOC_A, DOC_B):
            model(input_ids=doc[None], logits_to_keep=1)
    return model, handle


def last_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What generate's prefill computes: position ids from the mask, the last position's logits."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fully_repaired_rag_rows_are_exact_even_when_cut_short(family: str) -> None:
    reference = tiny_model(family)
    model, handle = warmed_rag_model(family, "selective", seam_tokens=CHUNK)
    rows, starts = rag_rows((5, 5, 9))  # row 2 leaves 9 tokens: row 0 reuses 28 of 32, row 1 12 of 16
    ids, mask = left_padded(rows)
    handle.reuse.set_segment_starts(starts)
    torch.testing.assert_close(last_logits(model, ids, mask), last_logits(reference, ids, mask), atol=1e-4, rtol=0)
    assert reused(handle) == [28, 12, 0]
    assert [row.approximate_tokens for row in handle.reuse.last.rows] == [12, 0, 0]  # doc_a's first 12, moved


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_rag_rows_of_a_padded_batch_match_each_row_alone(family: str) -> None:
    single, single_handle = warmed_rag_model(family, "cacheblend", ratio=0.25, check_layer=1)
    batched, batch_handle = warmed_rag_model(family, "cacheblend", ratio=0.25, check_layer=1)
    rows, starts = rag_rows((5, 5, 5))  # equal suffixes: every row reuses all it can
    alone = []
    for row, row_starts in zip(rows, starts):
        single_handle.reuse.set_segment_starts(row_starts)
        alone.append((last_logits(single, row[None], torch.ones(1, len(row), dtype=torch.long))[0],
                      single_handle.reuse.last.rows[0]))
    ids, mask = left_padded(rows)
    batch_handle.reuse.set_segment_starts(starts)
    logits = last_logits(batched, ids, mask)
    for b, (expected, stats) in enumerate(alone):
        torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=0)
        assert batch_handle.reuse.last.rows[b] == stats
    assert [stats.approximate_tokens for _, stats in alone] == [16, 0, 0]
    assert alone[0][1].recomputed_tokens == 4  # a quarter of the moved document, by CacheBlend


# -- Engine ------------------------------------------------------------------------------------------

def test_engine_generate_batch_reports_each_rows_reuse_and_matches_each_prompt_alone() -> None:
    engine = kvpatch.Engine(tiny_model("llama"), tiny_tokenizer(), reuse_config())
    system = "You review code. Be brief.\n"  # 27 tokens (bytes): chunks of 8 up to 24, a tail
    engine.warm(system)
    prompts = [system + "def f():\n", system[:20] + " Hi", "x = 1"]  # 36, 23 and 5 tokens
    results = engine.generate_batch(prompts, max_new_tokens=6)
    rows = engine.stats()["last_request"]["rows"]
    assert engine.handle.stats()["reuse"]["rows"] == rows
    # could reuse 24, 16, 0; row 0 leaves 12 to compute, so row 1 reuses its first 11
    assert [r.kv_reuse_ratio for r in results] == [row["kv_reuse_ratio"] for row in rows] == [24 / 36, 11 / 23, 0.0]
    with engine.reuse.paused():
        alone = [engine.generate(prompt, max_new_tokens=6) for prompt in prompts]
    assert [r.tokens for r in results] == [a.tokens for a in alone]
    assert [r.prompt_tokens for r in results] == [a.prompt_tokens for a in alone] == [36, 23, 5]


def test_tokenizer_padding_and_plain_generate_reuse_per_row_exactly() -> None:
    reference, model = tiny_model("qwen3"), tiny_model("qwen3")
    handle = kvpatch.apply(model, reuse_config())
    tokenizer = tiny_tokenizer()
    system = "Answer in one line, politely.\n"  # 30 tokens: chunks of 8 up to 24
    with torch.no_grad():
        model(**tokenizer(system, return_tensors="pt"), logits_to_keep=1)
    batch = tokenizer([system + "Why?", system + "How?", "Hi"], padding=True, return_tensors="pt")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), reference.generate(**batch, **kwargs))
    assert reused(handle) == [24, 24, 0]  # rows 0 and 1 leave 10 tokens each: both reuse all they can
