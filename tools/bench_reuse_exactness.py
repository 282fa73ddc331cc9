"""Is exact-prefix reuse lossless? kvpatch's `prefix_reuse` against the `kvboost` package on the
trained reference model in float32 (CPU), greedy decoding.

Each prompt: a shared prefix (real source text, several chunks long) warmed once, then
`prefix + question`; the greedy continuation with reuse is compared token for token with the
unpatched model's greedy continuation of the same token ids.

    pip install kvboost --no-deps   # pure Python; or PYTHONPATH to an unpacked wheel
    python tools/bench_reuse_exactness.py --out results/reuse-exactness-cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

import kvpatch

QUESTIONS = ["\ndef main():\n", "\nclass Config:\n", "\nimport os\n", "\n# parse the arguments\n", "\nif __name__ == ",
             "\ndef load(path):\n", "\nfor item in ", "\nreturn {"]


def prompts(tokenizer, count: int, prefix_tokens: int, seed: int) -> list[tuple[str, str]]:
    ids = tokenizer(kvpatch.models.heldout_text()).input_ids
    rng = random.Random(seed)
    out = []
    for i in range(count):
        start = rng.randrange(0, len(ids) - prefix_tokens)
        prefix = tokenizer.decode(ids[start : start + prefix_tokens])
        out.append((prefix, QUESTIONS[i % len(QUESTIONS)]))
    return out


def greedy_reference(model, tokenizer, text: str, new: int) -> list[int]:
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def agreement(a: list, b: list) -> float:
    """Share of `a` (tokens, or characters) reproduced before the first difference."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    reference, tokenizer = kvpatch.models.load("kvpatch-ref")
    cases = prompts(tokenizer, args.prompts, args.prefix_tokens, args.seed)
    expected = [greedy_reference(reference, tokenizer, p + q, args.new_tokens) for p, q in tqdm(cases, desc="reference")]
    results: dict[str, dict] = {}

    model, _ = kvpatch.models.load("kvpatch-ref")
    engine = kvpatch.Engine(model, tokenizer, "prefix_reuse")
    rows = []
    for (prefix, question), want in zip(tqdm(cases, desc="kvpatch"), expected):
        engine.warm(prefix)
        got = engine.generate(prefix + question, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        rows.append({"identical": got.tokens == want, "prefix_agreement": agreement(want, got.tokens),
                     "reuse": got.kv_reuse_ratio})
    results["kvpatch prefix_reuse"] = rows

    try:
        from kvboost import KVBoost
    except ImportError:
        print("kvboost is not installed: kvpatch only")
    else:
        for strategy in ("selective", "none"):
            model, _ = kvpatch.models.load("kvpatch-ref")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            boost = KVBoost(model, tokenizer, max_cache_bytes=2**30, chunk_size=128, recompute_strategy=strategy,
                            device="cpu")
            rows = []
            for (prefix, question), want in zip(tqdm(cases, desc=f"kvboost {strategy}"), expected):
                boost.warm(prefix)
                got = boost.generate(prefix + question, max_new_tokens=args.new_tokens)
                want_text = tokenizer.decode(want, skip_special_tokens=True)  # kvboost returns text only
                rows.append({"identical": got.output_text == want_text,
                             "prefix_agreement": agreement(list(want_text), list(got.output_text)),
                             "reuse": got.kv_reuse_ratio})
            results[f"kvboost {strategy}"] = rows

    summary = {name: {"identical": sum(r["identical"] for r in rows) / len(rows),
                      "mean_prefix_agreement": sum(r["prefix_agreement"] for r in rows) / len(rows),
                      "mean_reuse": sum(r["reuse"] for r in rows) / len(rows)} for name, rows in results.items()}
    for name, s in summary.items():
        print(f"{name:<22} identical {s['identical']:.3f}  share before first divergence {s['mean_prefix_agreement']:.3f}"
              f"  reuse {s['mean_reuse']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary,
                                        "rows": results}, indent=2))


if __name__ == "__main__":
    main()
