"""Non-prefix (RAG-style) chunk reuse on the trained reference model: none / selective /
cacheblend against full recompute.

Each example: a fixed system line, then D documents (real source text, one holding a needle
definition `key = 12345`), then the needle question. Every document is first warmed on its own
(after the system line), then the prompt presents them in a shuffled order, so the documents
that moved are reused approximately (content hash, keys re-rotated) and repaired by the strategy.
Reported per strategy: needle accuracy, first-token logit cosine / KL and greedy token agreement
against full recompute (reuse paused), reuse and recompute fractions.

    python tools/bench_reuse_fidelity.py --out results/reuse-fidelity-cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.data.needle import leading_digits, needle_strings, random_key_value

SYSTEM = "# Reference snippets from the project follow.\n"
STRATEGIES = {
    "none": {"impl": "none", "params": {}},
    "selective": {"impl": "selective", "params": {"seam_tokens": 16}},
    "cacheblend": {"impl": "cacheblend", "params": {"ratio": 0.15, "check_layer": 1}},
}


def config(strategy: str, chunk: int) -> dict:
    recompute = STRATEGIES[strategy]
    return {"name": f"rag_{strategy}", "fidelity": {"lossless": False}, "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": chunk}},
        {"kind": "matcher", "impl": "approximate", "params": {"repair": "configured"}},
        {"kind": "recompute", "impl": recompute["impl"], "params": recompute["params"]},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**30}},
    ]}


def documents(lines: list[str], rng: random.Random, count: int, lines_per_doc: int) -> tuple[list[str], str, str]:
    """`count` documents of consecutive source lines; one gets a needle line at a random place."""
    docs = []
    for _ in range(count):
        start = rng.randrange(0, len(lines) - lines_per_doc)
        docs.append(lines[start : start + lines_per_doc])
    key, value = random_key_value(rng)
    definition, query = needle_strings(key, value)
    holder = rng.randrange(count)
    docs[holder].insert(rng.randrange(1, lines_per_doc), definition.strip("\n"))
    return ["\n".join(d) + "\n" for d in docs], query.lstrip("\n"), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--lines-per-doc", type=int, default=14)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    lines = [line for line in kvpatch.models.heldout_text().splitlines() if line.strip()]
    rows: dict[str, list[dict]] = {name: [] for name in ["full", *STRATEGIES]}
    rng = random.Random(args.seed)
    examples = [documents(lines, rng, args.docs, args.lines_per_doc) for _ in range(args.examples)]
    for name in tqdm(STRATEGIES, desc="strategies"):
        engine = kvpatch.Engine(model, tokenizer, config(name, args.chunk))
        for docs, query, answer in tqdm(examples, desc=name, leave=False):
            for doc in docs:
                engine.warm([SYSTEM, doc])
            order = docs[:]
            random.Random(answer).shuffle(order)
            prompt = [SYSTEM, *order, query]
            if name == "none":  # the full-recompute reference, once per example
                with engine.reuse.paused():
                    tokens, logits = engine._greedy(engine.prepare(prompt), args.new_tokens)
                rows["full"].append({"correct": leading_digits(tokenizer.decode(tokens)) == answer,
                                     "tokens": tokens, "logits": logits})
            ids = engine.prepare(prompt)
            tokens, logits = engine._greedy(ids, args.new_tokens)
            stats = engine.reuse.last
            full = rows["full"][len(rows[name])]
            p, q = full["logits"].float(), logits.float()
            rows[name].append({
                "correct": leading_digits(tokenizer.decode(tokens)) == answer,
                "cosine": torch.nn.functional.cosine_similarity(p, q, dim=-1).item(),
                "kl": max(0.0, torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                                          reduction="sum").item()),
                "agreement": sum(a == b for a, b in zip(full["tokens"], tokens)) / len(tokens),
                "prompt_tokens": ids.shape[1], "reuse": stats.kv_reuse_ratio,
                "approximate": stats.approximate_ratio,
                "recomputed_of_prompt": stats.recomputed_tokens / ids.shape[1],
                "recomputed_of_approximate": stats.recomputed_tokens / max(stats.approximate_tokens, 1),
            })
        kvpatch.unpatch(model)

    summary = {"full": {"needle_accuracy": statistics.mean(r["correct"] for r in rows["full"])}}
    for name in STRATEGIES:
        r = rows[name]
        summary[name] = {key: statistics.mean(float(x[key]) for x in r) for key in
                         ("correct", "cosine", "kl", "agreement", "reuse", "approximate", "recomputed_of_prompt",
                          "recomputed_of_approximate", "prompt_tokens")}
        summary[name]["needle_accuracy"] = summary[name].pop("correct")
        summary[name]["min_cosine"] = min(x["cosine"] for x in r)
    print(f"{'strategy':<11} {'needle':>7} {'cos':>7} {'min cos':>8} {'KL':>7} {'agree':>6} {'reuse':>6} {'approx':>6} {'recomp':>7}")
    for name, s in summary.items():
        if name == "full":
            print(f"{'full':<11} {s['needle_accuracy']:>7.3f}")
            continue
        print(f"{name:<11} {s['needle_accuracy']:>7.3f} {s['cosine']:>7.4f} {s['min_cosine']:>8.4f} {s['kl']:>7.4f} "
              f"{s['agreement']:>6.3f} {s['reuse']:>6.3f} {s['approximate']:>6.3f} {s['recomputed_of_prompt']:>7.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
