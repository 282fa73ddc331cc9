"""The Engine API: a document warmed alone is reused as a segment anywhere (within the config's
declared fidelity), and one Engine or one patched model shared by threads gives the outputs of
single-threaded use."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import kvpatch
from kvpatch.concurrency import RequestLock
from kvpatch.models import load_named
from kvpatch.testing import prompt_ids, tiny_model

SYSTEM = "# Snippets follow.\n"
DOC_A = "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n" * 12
DOC_B = "def write_config(path, data):\n    with open(path, 'w') as f:\n        f.write(data)\n" * 10
QUESTION = "def main():\n"


@pytest.fixture(scope="module")
def rag_engine() -> kvpatch.Engine:
    return kvpatch.Engine.from_pretrained("kvpatch-ref", config="rag_reuse")


def test_segments_tokenize_alike_at_the_start_and_later(rag_engine: kvpatch.Engine) -> None:
    alone, alone_starts = rag_engine.encode(DOC_A)
    inside, starts = rag_engine.encode([SYSTEM, DOC_A])
    bos = rag_engine.tokenizer.bos_token_id
    assert alone[0, 0].item() == bos and alone_starts == [1]  # BOS is a segment of its own
    assert torch.equal(alone[0, 1:], inside[0, starts[1]:])
    assert alone[0].tolist() == rag_engine.tokenizer(DOC_A).input_ids  # a plain string is unchanged


def test_a_document_warmed_alone_is_reused_as_a_segment_anywhere(rag_engine: kvpatch.Engine) -> None:
    assert rag_engine.warm(DOC_A).chunks_written > 0
    assert rag_engine.warm(DOC_B).chunks_written > 0
    report = rag_engine.verify_correctness([[SYSTEM, DOC_A, DOC_B, QUESTION]], max_new_tokens=6, warm=False)
    check = report.prompts[0]
    assert check.kv_reuse_ratio > 0.8  # both documents, after another segment, at new positions
    assert report.min_logit_cosine >= rag_engine.handle.config.fidelity.min_logit_cosine


# -- threads ---------------------------------------------------------------------------------------

def _in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs at once (released together by a barrier); results in job order."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


SHARED = "The quick brown fox jumps over the lazy dog. " * 6
PROMPTS = [SHARED + tail for tail in ("Then it ran.", "Then it slept.", "Then it ate.", "Then it sang.")]


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Switch threads every microsecond, so that a race shows up in a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def tiny_engine() -> kvpatch.Engine:
    model, tokenizer = load_named("tiny-llama", "cpu")
    return kvpatch.Engine(model, tokenizer, "prefix_reuse")


def test_one_engine_shared_by_threads_matches_single_threaded_use(tiny_engine: kvpatch.Engine,
                                                                   switch_often: None) -> None:
    with tiny_engine.reuse.paused():
        expected = [tiny_engine.generate(p, max_new_tokens=8).tokens for p in PROMPTS]
        streamed = tiny_engine.generate(PROMPTS[0], max_new_tokens=8).output_text
    prompts = PROMPTS * 2  # the store starts empty: the threads write chunks while others read
    jobs: list[Callable[[], Any]] = [lambda p=p: tiny_engine.generate(p, max_new_tokens=8).tokens for p in prompts]
    jobs += [lambda: tiny_engine.warm(SHARED + "More text."), lambda: "".join(tiny_engine.stream(PROMPTS[0], 8))]
    results = _in_threads(jobs)
    assert results[: len(prompts)] == expected * 2
    assert results[-1] == streamed
    later = tiny_engine.generate(PROMPTS[1], max_new_tokens=8)  # what the threads stored is whole
    assert later.kv_reuse_ratio > 0.5 and later.tokens == expected[1]


def test_a_stream_holds_the_engine_until_closed(tiny_engine: kvpatch.Engine) -> None:
    pieces = tiny_engine.stream(PROMPTS[0], max_new_tokens=40)
    next(pieces)
    with pytest.raises(kvpatch.PatchStateError, match="Engine.generate while this thread's Engine.stream"):
        tiny_engine.generate(PROMPTS[1], max_new_tokens=4)
    pieces.close()  # stops the generation early and releases the Engine
    assert _in_threads([lambda: len(tiny_engine.generate(PROMPTS[1], max_new_tokens=4).tokens)]) == [4]


def test_request_lock_makes_other_threads_wait() -> None:
    lock = RequestLock("thing")
    entered = threading.Event()

    def other() -> None:
        with lock.held("call"):
            entered.set()

    with lock.held("call"):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.2)  # still held here
    thread.join(5)
    assert entered.is_set()


def test_forward_guard_serialises_a_patched_model_shared_by_threads(switch_often: None) -> None:
    """`apply` installs the guard: threads sharing one patched model (no Engine) take turns per
    forward and get what they would get alone; `unpatch` takes the hooks off again."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    kvpatch.apply(model, {"name": "reuse8", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": 8}}, {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**26}}]})
    shared = prompt_ids(batch=1, length=24, seed=3)
    prompts = [torch.cat([shared, prompt_ids(batch=1, length=6, seed=seed)], dim=1) for seed in range(4)]

    def greedy(on: torch.nn.Module, ids: torch.Tensor) -> list[int]:
        with torch.no_grad():
            out = on.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    expected = [greedy(reference, ids) for ids in prompts]
    assert _in_threads([lambda ids=ids: greedy(model, ids) for ids in prompts * 2]) == expected * 2
    kvpatch.unpatch(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
