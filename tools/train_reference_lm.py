#!/usr/bin/env python
"""Train kvpatch's reference model: a small Llama (GQA, RoPE) and its byte-level BPE tokenizer.

No model hub is reachable where kvpatch runs, so every fidelity claim (quantization, eviction,
reuse) is measured on this model. It learns from the Python sources installed on the machine
(see kvpatch/data/corpus.py) plus a share of synthetic key-value retrieval rows
(kvpatch/data/needle.py), so that "does compression break retrieval?" has a clear baseline.

The whole run (corpus, tokenizer, training, evaluation, saving) fits one 10-minute GPU command:
training stops at --time-budget-s. The output directory is a regular transformers model
directory plus `training_report.json` and `heldout.txt` (the text perplexity is measured on).

A longer run is split into calls that each fit one command: `--resume DIR` continues the run
whose last call wrote DIR. Each call of such a run (given `--total-time-budget-s`,
`--total-steps`, `--resume` or `--save-state`; a plain run writes only the model, so that
kvpatch/models/ gets no 0.1 GB of optimizer state) also writes `trainer_state.safetensors`
(float32 master weights, since model.safetensors holds bf16 ones; AdamW moments and step
counts; the corpus-window generator) and `trainer_state.json` (step, tokens, training seconds,
the schedule's totals, the recipe, the data generators' states, one entry per call). Both are
ours and hold no pickle: safetensors and JSON, so resuming never unpickles anything. A resumed
call loads the tokenizer from DIR (the vocabulary stays identical; it is not retrained), checks
that its recipe flags match the run's, and goes on with the same random data stream, so N
steps then N resumed steps train as one 2N-step run would. `--total-time-budget-s` (or
`--total-steps`) is the plan over all calls: the cosine schedule and the needle boost are laid
over it, while each call trains for its own `--time-budget-s` (or `--steps`); training past the
total stays at the floor learning rate. `--skip-eval` skips the evaluation of intermediate
calls. The report's steps, tokens_seen and train_wall_s are totals over the calls; `calls`
lists each call (its steps, wall times, first and last learning rate, schedule progress).

`--shape` picks the model: `ref` (the shipped kvpatch-ref, 11.0 M parameters, 2048-token rows)
or `ref-large` (53.5 M parameters, 8192-token rows, not shipped: its bf16 weights are over the
package limit; tools/gpu/train_large_ref.sh trains it). ref-large trains at 8192 tokens from the
first step, with no length curriculum: every packed needle or task row already holds examples
from a few dozen tokens up to the whole row (log-uniform), which is what teaches retrieval
early, and with flash attention an 8K row costs this model ~1.6x the FLOPs per token of a 2K
row (attention is about half of them at 8K), not 4x. What ref-large adds: a share of rows of
the RULER-style tasks (`--task-share`, kvpatch/data/tasks.py: several keys, several values,
variable chains), whose answers get the same extra loss as the needle's, and a share of needle
rows holding one long example of half to all of the row (`--long-needle-share`), because
log-uniform lengths alone put few needles 4-8K tokens before their question and the target is
accuracy at full context. Both are 0 for `ref`, whose recipe is unchanged.

    python tools/train_reference_lm.py --out kvpatch/models/kvpatch-ref --device cuda \\
        --include-site-packages --time-budget-s 420
    python tools/train_reference_lm.py --shape ref-large --out .large-ref/kvpatch-ref-large \\
        --device cuda --include-site-packages --time-budget-s 380 --wall-budget-s 500
    python tools/train_reference_lm.py --tiny --out /tmp/ref_tiny --device cpu   # seconds
    python tools/train_reference_lm.py --tiny --out /tmp/ref_tiny2 --device cpu --total-steps 24
    python tools/train_reference_lm.py --tiny --device cpu --resume /tmp/ref_tiny2  # steps 13-24
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()  # the wall-clock budget counts from here (after torch's import)


if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(ROOT))

from kvpatch.data import corpus as corpus_lib  # noqa: E402
from kvpatch.data import needle  # noqa: E402
from kvpatch.data import tasks as tasks_lib  # noqa: E402
from kvpatch.models import reference  # noqa: E402

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
NEEDLE_DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
HELDOUT_PPL_SEQ_LEN = 1024


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0


FULL_SHAPE = ModelShape(384, 6, 6, 2, 64, 1024, 4096)
# 4.86x ref's parameters (53,490,432 against 11,015,040) and GQA 3:1 as ref: 8 layers of width
# 768 rather than 10-12 narrower ones (same FLOPs per token, fewer and larger kernels). RoPE
# theta 500000 as Llama 3 at 8K: slow-turning dimensions for matching a key ~8K tokens back.
LARGE_SHAPE = ModelShape(768, 8, 12, 4, 64, 2048, 4096, rope_theta=500000.0)
TINY_SHAPE = ModelShape(64, 2, 4, 2, 16, 128, 512)
SHAPES = {"ref": FULL_SHAPE, "ref-large": LARGE_SHAPE}
# Needle evaluation lengths of each shape (those up to --seq-len are used).
NEEDLE_LENGTHS = {"ref": (256, 512, 1024, 2048), "ref-large": (1024, 2048, 4096, 8192)}

# Settings --tiny fills in when the flag is not given: seconds on a CPU, for tests.
TINY_DEFAULTS: dict[str, Any] = dict(
    steps=12,
    seq_len=128,
    batch_size=8,
    corpus_max_bytes=1_200_000,
    tokenizer_max_bytes=600_000,
    needle_lengths=[64, 128],
    needle_per_cell=2,
    eval_tokens=8192,
    warmup_steps=2,
    log_every=4,
    lr=2e-3,
    task_share=0.0,
    long_needle_share=0.0,
)
FULL_DEFAULTS: dict[str, Any] = dict(
    steps=None,
    seq_len=2048,
    batch_size=32,
    corpus_max_bytes=200_000_000,
    tokenizer_max_bytes=40_000_000,
    needle_lengths=None,
    needle_per_cell=20,
    eval_tokens=1_048_576,
    warmup_steps=200,
    log_every=50,
    lr=2e-3,
    task_share=0.0,
    long_needle_share=0.0,
)
# ref-large: 8 x 8192 tokens per step (65,536, as ref's 32 x 2048), a lower peak learning rate
# for the larger model, 10 % task rows and a quarter of the needle rows long.
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ref": FULL_DEFAULTS,
    "ref-large": {
        **FULL_DEFAULTS,
        "seq_len": 8192,
        "batch_size": 8,
        "lr": 1.5e-3,
        "task_share": 0.1,
        "long_needle_share": 0.25,
    },
}
DEFAULT_TIME_BUDGET_S = 420.0
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = 1
# Flags a resumed call must share with the run: they shape the model, the data or the schedule.
RECIPE_KEYS = (
    "tiny", "shape", "seq_len", "batch_size", "lr", "warmup_steps", "seed", "needle_share",
    "needle_boost_share", "needle_boost_frac", "task_share", "long_needle_share",
    "answer_loss_weight", "include_site_packages", "corpus_max_bytes",
)
EVAL_RESERVE_S = 60.0  # saving + evaluation after training, with room to spare (~15 s on a GPU)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output model directory (default with --resume: the resumed one)")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"continue the run whose last call wrote DIR (its {STATE_JSON} and "
        f"{STATE_TENSORS}); pass the same recipe flags",
    )
    p.add_argument(
        "--total-time-budget-s",
        type=float,
        default=None,
        help="planned training seconds of all calls together: the schedules span them "
        "(default: this call's budget; on --resume, the run's)",
    )
    p.add_argument(
        "--total-steps",
        type=int,
        default=None,
        help="planned steps of all calls together, as --total-time-budget-s",
    )
    p.add_argument(
        "--save-state",
        action="store_true",
        help="write the trainer state for a later --resume (implied by --resume and --total-*)",
    )
    p.add_argument(
        "--skip-eval",
        action="store_true",
        help="save but do not evaluate (intermediate calls of a resumed run)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model shape and its default recipe: ref (default, the shipped kvpatch-ref) or "
        "ref-large (8192-token context, not shipped); --tiny has its own toy shape",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help=f"stop training after this many seconds (default {DEFAULT_TIME_BUDGET_S:g} "
        "unless --steps or --tiny is given)",
    )
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument(
        "--wall-budget-s",
        type=float,
        default=None,
        help="cut training short so that the whole run ends within this many seconds "
        f"(default 540 without --tiny: a 10-minute command; 0 disables); {EVAL_RESERVE_S:g} s "
        "are kept for saving and evaluation",
    )
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; "
                   "ref-large 1.5e-3)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument(
        "--needle-share",
        type=float,
        default=0.2,
        help="fraction of each batch made of packed needle rows",
    )
    p.add_argument(
        "--needle-boost-share",
        type=float,
        default=0.75,
        help="needle share during the first --needle-boost-frac of training",
    )
    p.add_argument(
        "--needle-boost-frac",
        type=float,
        default=0.2,
        help="fraction of training (of steps or of the time budget) with the boosted share",
    )
    p.add_argument(
        "--task-share",
        type=float,
        default=None,
        help="fraction of each batch made of packed RULER-style task rows (multikey, "
        "multivalue, vartrack; default 0, ref-large 0.1)",
    )
    p.add_argument(
        "--long-needle-share",
        type=float,
        default=None,
        help="fraction of needle rows holding one example of at least half the row "
        "(default 0, ref-large 0.25)",
    )
    p.add_argument(
        "--answer-loss-weight",
        type=float,
        default=1.0,
        help="weight of the extra loss on needle answer digits",
    )
    p.add_argument("--corpus-max-bytes", type=int, default=None)
    p.add_argument(
        "--tokenizer-max-bytes",
        type=int,
        default=None,
        help="train the tokenizer on at most this much text (files spread evenly)",
    )
    p.add_argument(
        "--include-site-packages",
        action="store_true",
        help="add site-packages sources to the stdlib (more, but machine-specific, text)",
    )
    p.add_argument("--needle-lengths", type=int, nargs="+", default=None)
    p.add_argument("--needle-depths", type=float, nargs="+", default=list(NEEDLE_DEPTHS))
    p.add_argument("--needle-per-cell", type=int, default=None)
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="validation tokens used for the validation perplexity",
    )
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    p.add_argument("--tiny", action="store_true", help="toy model and settings (CPU tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out is None:
        if args.resume is None:
            p.error("--out is required (or --resume DIR)")
        args.out = args.resume
    for name in ("total_time_budget_s", "total_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
        args.save_state |= getattr(args, name) is not None
    args.save_state |= args.resume is not None
    if args.tiny and args.shape not in (None, "ref"):
        p.error("--tiny trains its own toy shape; leave --shape out")
    args.shape = args.shape or "ref"
    for key, value in (TINY_DEFAULTS if args.tiny else SHAPE_DEFAULTS[args.shape]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("needle_share", "task_share", "long_needle_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.time_budget_s is None and args.steps is None:
        args.time_budget_s = DEFAULT_TIME_BUDGET_S
    if args.wall_budget_s is None and not args.tiny:
        args.wall_budget_s = 540.0
    if args.needle_lengths is None:
        grid = NEEDLE_LENGTHS[args.shape]
        args.needle_lengths = [n for n in grid if n <= args.seq_len] or [args.seq_len]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.resume is not None and (problem := resume_problem(args)):
        p.error(f"--resume {args.resume}: {problem}")
    return args


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in RECIPE_KEYS}


def resume_problem(args: argparse.Namespace) -> str | None:
    """Why `args.resume` cannot be continued with these flags, or None."""
    for name in (STATE_JSON, STATE_TENSORS, "tokenizer.json"):
        if not (args.resume / name).is_file():
            return (f"{args.resume / name} not found: --resume takes a directory written by "
                    "this script with --total-time-budget-s, --total-steps or --save-state")
    state = json.loads((args.resume / STATE_JSON).read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        return f"{args.resume / STATE_JSON} has format {state.get('format')}, not {STATE_FORMAT}"
    ours = recipe(args)
    diff = [f"{k} {ours[k]!r} (run: {state['recipe'].get(k)!r})"
            for k in RECIPE_KEYS if state["recipe"].get(k) != ours[k]]
    return "flags differ from the run's: " + ", ".join(diff) if diff else None


def log(msg: str) -> None:
    print(f"[train_reference_lm] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data


def spread_sample(texts: list[str], max_bytes: int) -> list[str]:
    """Every k-th text so that about `max_bytes` are taken from across the whole corpus
    (a prefix would over-represent the alphabetically first packages)."""
    total = sum(len(t) for t in texts)
    if total <= max_bytes:
        return texts
    stride = math.ceil(total / max_bytes)
    return texts[::stride]


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> Any:
    """Byte-level BPE (digits split one by one, so numbers copy digit by digit), wrapped as a
    transformers fast tokenizer that adds <bos> in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )


def encode_stream(tokenizer: Any, texts: list[str], chunk: int = 256) -> np.ndarray:
    """One int32 token stream: <bos> file <eos> <bos> file <eos> ... (batched in Rust)."""
    backend = tokenizer.backend_tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        encodings = backend.encode_batch(texts[start : start + chunk], add_special_tokens=False)
        for enc in encodings:
            parts.append(np.asarray([bos, *enc.ids, eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------- model


def model_config(shape: ModelShape, tokenizer: Any, seq_len: int) -> Any:
    """The LlamaConfig of `shape` trained at `seq_len` (its max_position_embeddings); only the
    tokenizer's special token ids are read."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )


def build_model(shape: ModelShape, tokenizer: Any, seq_len: int) -> Any:
    from transformers import GenerationConfig, LlamaForCausalLM

    model = LlamaForCausalLM(model_config(shape, tokenizer, seq_len))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def n_params(model: torch.nn.Module) -> int:
    """Parameter count with tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def shape_parameters(shape: ModelShape, seq_len: int) -> tuple[int, Any]:
    """(parameter count, config) of `shape` without allocating or initialising weights (the
    model is built on the meta device), so shapes can be compared without training them."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    ids = SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # SPECIAL_TOKENS order
    config = model_config(shape, ids, seq_len)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return n_params(model), config


# ----------------------------------------------------------------------------- training


def needle_rows(batch_size: int, share: float) -> int:
    """Needle rows in a batch: the share rounded, at least one when the share is positive."""
    if share <= 0:
        return 0
    return min(max(round(batch_size * share), 1), batch_size)


class BatchMaker:
    """Training batches: random windows of the corpus stream plus packed needle rows and packed
    task rows (`--task-share`, a fixed number of rows per batch, each of a random task).

    For the first `needle_boost_frac` of training a larger share of rows are needle rows:
    retrieval is learned in an abrupt transition that needs many examples, and after it a
    smaller share keeps it (CPU trials: at a 20 % share alone a small model had not started
    to retrieve after 1500 steps; with every row a needle row it did within 800). Task rows
    keep their share throughout; needle rows give way if both would not fit.
    """

    def __init__(
        self, stream: np.ndarray, tokenizer: Any, args: argparse.Namespace, device: torch.device
    ) -> None:
        self.stream_cpu = stream
        self.stream = torch.from_numpy(stream).to(device)
        self.tokenizer = tokenizer
        self.row_len = args.seq_len + 1
        self.batch_size = args.batch_size
        self.n_task = needle_rows(args.batch_size, args.task_share)
        room = args.batch_size - self.n_task
        self.n_needle = min(needle_rows(args.batch_size, args.needle_share), room)
        self.n_needle_boost = min(needle_rows(args.batch_size, args.needle_boost_share), room)
        self.boost_until = args.needle_boost_frac
        self.long_needle_share = args.long_needle_share
        self.device = device
        self.gen = torch.Generator().manual_seed(args.seed)
        self.rng = random.Random(f"train-needles:{args.seed}")
        # Own generators, so that rows of a run without tasks or long needles are unchanged.
        self.task_rng = random.Random(f"train-tasks:{args.seed}")
        self.long_rng = random.Random(f"train-long-needles:{args.seed}")
        self.offsets = torch.arange(self.row_len, device=device)
        self.rows_seen = {"corpus": 0, "needle": 0, "long_needle": 0, "task": 0}
        self.task_rows_seen = dict.fromkeys(tasks_lib.TASKS, 0)
        if len(stream) <= self.row_len:
            raise ValueError(f"corpus has {len(stream)} tokens, fewer than one row")
        if self.n_task:
            for task in tasks_lib.TASKS:  # a row too short for one example would be all filler
                least = sum(tasks_lib.task_overhead(task, tokenizer)) + 8
                if least > self.row_len:
                    raise ValueError(f"--seq-len {args.seq_len} is too short for a {task} row "
                                     f"(needs {least} tokens)")

    def __call__(self, progress: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, answer_mask) at `progress` (0..1) of training; the mask marks
        targets that are needle or task answers. Rows: corpus, then needle, then task rows."""
        n_needle = self.n_needle_boost if progress < self.boost_until else self.n_needle
        n_corpus = self.batch_size - n_needle - self.n_task
        rows, masks = [], []
        if n_corpus:
            starts = torch.randint(
                0, len(self.stream_cpu) - self.row_len, (n_corpus,), generator=self.gen
            ).to(self.device)
            rows.append(self.stream[starts[:, None] + self.offsets])
            masks.append(torch.zeros(n_corpus, self.row_len, dtype=torch.bool, device=self.device))
        made = [self._needle_row() for _ in range(n_needle)]
        made += [self._task_row() for _ in range(self.n_task)]
        if made:
            rows.append(
                self._to_device(torch.tensor([r.input_ids for r in made], dtype=torch.int32))
            )
            masks.append(self._to_device(torch.tensor([r.answer_mask for r in made])))
        self.rows_seen["corpus"] += n_corpus
        batch, mask = torch.cat(rows).long(), torch.cat(masks)
        return batch[:, :-1], batch[:, 1:], mask[:, 1:]

    def _needle_row(self) -> needle.TrainingRow:
        """A packed needle row; with `long_needle_share`, sometimes one example of at least half
        the row (its question that far from the needle), the rest plain filler."""
        self.rows_seen["needle"] += 1
        long = self.long_needle_share > 0 and self.long_rng.random() < self.long_needle_share
        self.rows_seen["long_needle"] += long
        least = self.row_len // 2 if long else None
        return needle.make_training_row(
            self.tokenizer, self.stream_cpu, self.row_len, self.rng, min_context=least
        )

    def _task_row(self) -> needle.TrainingRow:
        """A packed row of one task of kvpatch.data.tasks, drawn at random."""
        task = self.task_rng.choice(tasks_lib.TASKS)
        self.rows_seen["task"] += 1
        self.task_rows_seen[task] += 1
        return tasks_lib.make_task_training_row(
            task, self.tokenizer, self.stream_cpu, self.row_len, self.task_rng
        )

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def state(self) -> tuple[dict[str, Any], torch.Tensor]:
        """(JSON part, corpus generator state): where the data stream stands, for a resume."""
        rngs = {name: getattr(self, name).getstate() for name in ("rng", "task_rng", "long_rng")}
        meta = {"rngs": rngs, "rows_seen": self.rows_seen, "task_rows_seen": self.task_rows_seen}
        return json.loads(json.dumps(meta)), self.gen.get_state()

    def restore(self, meta: dict[str, Any], gen_state: torch.Tensor) -> None:
        """Continue the data stream where `state()` left it."""
        self.gen.set_state(gen_state)
        for name, (version, internal, gauss) in meta["rngs"].items():
            getattr(self, name).setstate((version, tuple(internal), gauss))
        self.rows_seen = dict(meta["rows_seen"])
        self.task_rows_seen = dict(meta["task_rows_seen"])


def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine to `floor * peak` over `progress` (0..1 of steps or time)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_loss_fn(
    model: Any, device: torch.device, compile_model: bool, answer_weight: float
) -> Any:
    """(objective, lm_loss): next-token cross-entropy, plus `answer_weight` times the mean
    cross-entropy of the needle answer digits (a few dozen of the step's tokens, which would
    otherwise teach retrieval too slowly)."""
    vocab = model.config.vocab_size

    def loss_fn(x: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1), reduction="none")
        lm_loss = ce.mean()
        weights = answer_mask.reshape(-1).to(ce.dtype)
        answer_loss = (ce * weights).sum() / weights.sum().clamp(min=1.0)
        return lm_loss + answer_weight * answer_loss, lm_loss

    return torch.compile(loss_fn) if compile_model else loss_fn


def make_optimizer(
    model: torch.nn.Module, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms (1-d parameters)."""
    params = list({id(p): p for p in model.parameters()}.values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **extra)


def train(
    model: Any,
    batches: BatchMaker,
    args: argparse.Namespace,
    device: torch.device,
    schedule: Schedule,
    opt_state: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], torch.optim.Optimizer]:
    """The training loop of this call (`args.steps` steps or `args.time_budget_s` seconds) at
    `schedule`'s place in the run, from the optimizer state `opt_state` if given (a resume);
    returns its statistics for the report and the optimizer."""
    from tqdm import tqdm

    compile_model = device.type == "cuda" and not args.no_compile
    loss_fn = make_loss_fn(model, device, compile_model, args.answer_loss_weight)
    opt = make_optimizer(model, args.lr, device)
    if opt_state is not None:
        restore_optimizer(opt, model, opt_state)
    tokens_per_step = args.batch_size * args.seq_len
    budget, max_steps = args.time_budget_s, args.steps
    model.train()
    step, running, n_running = 0, torch.zeros(2, device=device), 0
    last_loss, last_answer = float("nan"), float("nan")
    first_step_s, progress = 0.0, schedule.progress(0, 0.0, 0.0)
    lr_first = lr_last = float("nan")
    t0 = time.perf_counter()
    bar = tqdm(total=max_steps, unit="step", mininterval=10.0, file=sys.stdout, disable=None)
    while True:
        elapsed = time.perf_counter() - t0
        if (max_steps is not None and step >= max_steps) or (budget and elapsed >= budget):
            break
        progress = schedule.progress(step, elapsed, first_step_s)
        lr = lr_at(schedule.done_steps + step, progress, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        lr_first = lr if step == 0 else lr_first
        lr_last = lr
        x, y, answer_mask = batches(progress)
        try:
            objective, loss = forward_backward(loss_fn, x, y, answer_mask)
        except Exception as exc:  # a compile failure must not cost the GPU run
            if step or not compile_model:
                raise
            log(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing in eager mode")
            compile_model = False
            opt.zero_grad(set_to_none=True)
            loss_fn = make_loss_fn(model, device, False, args.answer_loss_weight)
            objective, loss = forward_backward(loss_fn, x, y, answer_mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += torch.stack([loss, objective - loss])
        n_running += 1
        step += 1
        bar.update(1)
        if step == 1:
            first_step_s = _sync_time(device) - t0
            t_steady = time.perf_counter()
        if (schedule.done_steps + step) % args.log_every == 0:  # the run's steps, not the call's
            last_loss, last_answer = (running / n_running).tolist()
            running.zero_()
            n_running = 0
            done = time.perf_counter() - t0
            rate = (step - 1) * tokens_per_step / max(time.perf_counter() - t_steady, 1e-9)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            log(
                f"step {schedule.done_steps + step} loss {last_loss:.4f} answer {last_answer:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:,.0f} tok/s {done:.0f}s"
            )
    if n_running:
        last_loss, last_answer = (running / n_running).tolist()
    wall = _sync_time(device) - t0
    bar.close()
    steady_s = wall - first_step_s
    stats = {
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "train_wall_s": round(wall, 2),
        "first_step_s": round(first_step_s, 2),
        "tokens_per_s": round((step - 1) * tokens_per_step / steady_s, 1) if step > 1 else None,
        "tokens_per_s_overall": round(step * tokens_per_step / wall, 1) if wall > 0 else None,
        "final_train_loss": _rounded(last_loss),
        "final_answer_loss_weighted": _rounded(last_answer),
        "compiled": compile_model,
        "lr_first": lr_first if step else None,
        "lr_last": lr_last if step else None,
        "progress_end": round(schedule.progress(step, wall, first_step_s), 4),
    }
    return stats, opt


def forward_backward(
    loss_fn: Any, x: torch.Tensor, y: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one batch; returns (objective, language-modelling loss). Forward and
    backward go together because compilation may fail in either."""
    objective, lm_loss = loss_fn(x, y, answer_mask)
    objective.backward()
    return objective.detach(), lm_loss.detach()


@dataclass(frozen=True)
class Schedule:
    """The planned whole run, over which the learning rate and the needle boost are laid
    (`total_steps` and/or `total_time_s`), and what earlier calls of it trained: `done_steps`
    steps in `done_train_s` seconds, `done_first_steps_s` of them in first steps."""

    total_steps: int | None
    total_time_s: float | None
    done_steps: int = 0
    done_train_s: float = 0.0
    done_first_steps_s: float = 0.0

    def progress(self, step: int, elapsed: float, first_step_s: float) -> float:
        """How far the whole run is (0..1, more past the plan) after `step` steps of this call
        in `elapsed` seconds, by steps or by time, whichever is further. Time does not count
        first steps: on CUDA they compile the model, and the schedules should follow the steps
        actually trained (later calls' first steps are not known yet and are not discounted,
        so a resumed call's progress jumps by about first_step_s / total_time_s)."""
        by_steps = (self.done_steps + step) / self.total_steps if self.total_steps else 0.0
        by_time = 0.0
        if self.total_time_s:
            steady = self.done_train_s - self.done_first_steps_s
            if step:
                steady += elapsed - first_step_s
            room = self.total_time_s - self.done_first_steps_s - first_step_s
            by_time = steady / max(room, 1e-9)
        return max(by_steps, by_time)


def _rounded(value: float, digits: int = 4) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------- resume


def optimizer_param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of the optimizer's state indices (tied weights once)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def restore_optimizer(
    opt: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> None:
    """Load the AdamW moments and step counts saved by `save_trainer_state` into a freshly
    made optimizer (its hyperparameters stay this call's; the run's recipe check keeps them
    equal); load_state_dict moves them to the parameters' device."""
    state_dict = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(optimizer_param_names(model, opt)):
        prefix = f"optim/{name}/"
        state[index] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not {"step", "exp_avg", "exp_avg_sq"} <= set(state[index]):
            raise ValueError(f"{STATE_TENSORS} lacks the optimizer state of {name}")
    state_dict["state"] = state
    opt.load_state_dict(state_dict)


def _write_atomic(path: Path, write: Any) -> None:
    """`write(tmp)` then rename, so that a call killed mid-write leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_trainer_state(
    out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, batches: BatchMaker,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Write what a resume needs (module docstring) before the model is cast to bf16, and
    return the JSON part. The tensors file records the run's step count, which
    `load_trainer_state` checks against the JSON (a call killed between the two writes)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{n}": p.detach().float().cpu().contiguous()
               for n, p in model.named_parameters()}
    names = optimizer_param_names(model, opt)
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            tensors[f"optim/{names[index]}/{key}"] = value.detach().cpu().contiguous()
    batches_meta, tensors["rng/corpus_windows"] = batches.state()
    steps = str(run["steps"])
    _write_atomic(out / STATE_TENSORS,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"steps": steps}))
    state = {**run, "batches": batches_meta}
    write_state_json(out, state)
    return state


def write_state_json(out: Path, state: dict[str, Any]) -> None:
    text = json.dumps({"format": STATE_FORMAT, **state}, indent=1) + "\n"
    _write_atomic(out / STATE_JSON, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON state, tensors) of a run's last call. Our own files, read without unpickling:
    JSON and safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    with safe_open(str(directory / STATE_TENSORS), "pt") as f:
        steps = (f.metadata() or {}).get("steps")
    if steps != str(state["steps"]):
        raise ValueError(f"{directory / STATE_TENSORS} is of step {steps} but {STATE_JSON} of "
                         f"step {state['steps']}: the call that wrote them was interrupted")
    return state, load_file(str(directory / STATE_TENSORS))


def restore_model(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    """Copy the float32 master weights into `model`, after checking that they are the ones
    model.safetensors holds in bf16 (a state left by another call would not be)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for name, param in params.items():
        saved = tensors.get(f"model/{name}")
        if saved is None or saved.shape != param.shape:
            raise ValueError(f"{directory / STATE_TENSORS}: no weights of shape "
                             f"{tuple(param.shape)} for {name}")
        with torch.no_grad():
            param.copy_(saved)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        log(f"no {weights} to check the trainer state against (sharded?): not checked")
        return
    with safe_open(str(weights), "pt") as f:
        shared = set(f.keys()) & set(params)  # the tied lm_head is saved once, or not
        if not shared:
            raise ValueError(f"{weights} holds none of the model's parameter names")
        for name in shared:
            if not torch.equal(f.get_tensor(name), params[name].detach().to(torch.bfloat16)):
                raise ValueError(f"{directory / STATE_TENSORS} does not match {weights} "
                                 f"({name}): the call that wrote them was interrupted")


def tokenizer_files(directory: Path) -> list[Path]:
    """The files `save_pretrained` wrote for a tokenizer in `directory`."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return [directory / name for name in names if (directory / name).is_file()]


def load_tokenizer(directory: Path) -> Any:
    """The run's tokenizer as the first call saved it (retraining could change the vocabulary)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)


# ----------------------------------------------------------------------------- eval & save

EVAL_ATTENTION_BYTES = 16 * 2**30


def eval_rows(config: Any, length: int, most: int) -> int:
    """Rows of `length` tokens per forward in the float32 evaluation, at most `most`. Float32
    attention with grouped KV heads may find no fused CUDA kernel (flash and cuDNN take 16-bit
    inputs only) and fall back to SDPA's math path, which holds about three rows x heads x
    length^2 float32 tensors: ~10 GB a row at 8192 tokens and 12 heads, so 20 rows would not fit
    an H200; ref's 2048-token rows keep their batches (under the cap)."""
    per_row = 3 * config.num_attention_heads * length * length * 4
    return max(1, min(most, EVAL_ATTENTION_BYTES // per_row))


def evaluate(
    out: Path, val_stream: np.ndarray, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Metrics of the model *as saved* (bf16 weights), computed in float32 so that a CPU
    reproduces them."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tokenizer = reference.load(out, device=device, dtype=torch.float32)
    heldout = reference.heldout_text(out)
    heldout_ids = needle.encode(tokenizer, heldout)
    ppl_len = min(HELDOUT_PPL_SEQ_LEN, args.seq_len)
    results: dict[str, Any] = {
        "eval_dtype": "float32",
        "val_perplexity": round(
            reference.perplexity(
                model,
                val_stream,
                seq_len=args.seq_len,
                batch_size=eval_rows(model.config, args.seq_len, 8),
                max_tokens=args.eval_tokens,
            ),
            3,
        ),
        "val_perplexity_tokens": int(min(len(val_stream), args.eval_tokens))
        // args.seq_len
        * args.seq_len,
        "val_perplexity_seq_len": args.seq_len,
        "heldout_perplexity": round(reference.perplexity(model, heldout_ids, seq_len=ppl_len), 3),
        "heldout_perplexity_seq_len": ppl_len,
        "heldout_tokens": len(heldout_ids),
    }
    grid: dict[str, dict[str, float]] = {}
    for length in args.needle_lengths:  # one length at a time: its own batch size
        grid |= needle.needle_grid(
            model,
            tokenizer,
            heldout_ids,
            [length],
            args.needle_depths,
            args.needle_per_cell,
            seed=args.seed,
            batch_size=eval_rows(model.config, length, max(1, min(args.needle_per_cell, 32))),
        )
    cells = [acc for row in grid.values() for acc in row.values()]
    results["needle_accuracy"] = grid
    results["needle_accuracy_mean"] = round(sum(cells) / len(cells), 4)
    results["needle_protocol"] = {
        "filler": "heldout.txt",
        "seed": args.seed,
        "per_cell": args.needle_per_cell,
        "lengths": list(args.needle_lengths),
        "depths": list(args.needle_depths),
        "api": "kvpatch.data.needle.needle_grid",
    }
    return results


def save(
    model: Any, tokenizer: Any, out: Path, heldout: str, tokenizer_dir: Path | None = None
) -> int:
    """Write the model in bf16 (the ship size limit) and return the weights file size. A
    resumed run keeps the tokenizer files of `tokenizer_dir` byte for byte (saving a loaded
    tokenizer would add loading options to tokenizer_config.json)."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    if tokenizer_dir is None:
        tokenizer.save_pretrained(out)
    elif tokenizer_dir.resolve() != out.resolve():
        for path in tokenizer_files(tokenizer_dir):
            shutil.copyfile(path, out / path.name)
    (out / reference.HELDOUT_FILE).write_text(heldout, encoding="utf-8")
    return (out / "model.safetensors").stat().st_size


def environment(device: torch.device) -> dict[str, Any]:
    import tokenizers
    import transformers

    hw: dict[str, Any] = {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return {"hardware": hw, "versions": versions}


def training_budget(args: argparse.Namespace, started: float) -> float | None:
    """The training time budget, shortened if setup was slow enough to endanger the wall budget
    (a GPU command that runs past its limit loses everything)."""
    if not args.wall_budget_s:
        return args.time_budget_s
    left = args.wall_budget_s - (time.perf_counter() - started) - EVAL_RESERVE_S
    if args.time_budget_s is not None and args.time_budget_s <= left:
        return args.time_budget_s
    left = round(max(left, 1.0), 1)
    log(f"training capped at {left:.0f}s to end within --wall-budget-s {args.wall_budget_s:g}")
    return left


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = STARTED if argv is None else time.perf_counter()
    device = torch.device(args.device)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    phases: dict[str, float] = {}

    t = time.perf_counter()
    corpus = corpus_lib.build_corpus(args.include_site_packages, max_bytes=args.corpus_max_bytes)
    heldout = corpus_lib.heldout_text(corpus.validation)
    phases["corpus_s"] = time.perf_counter() - t
    log(
        f"corpus: {len(corpus.files)} files, {len(corpus.train)} train / "
        f"{len(corpus.validation)} validation, {corpus.n_bytes / 1e6:.1f} MB"
    )

    t = time.perf_counter()
    shape = TINY_SHAPE if args.tiny else SHAPES[args.shape]
    state, state_tensors = load_trainer_state(args.resume) if args.resume else ({}, {})
    if args.resume:
        tokenizer = load_tokenizer(args.resume)
        phases["load_s"] = time.perf_counter() - t
    else:
        tok_texts = spread_sample(corpus.train, args.tokenizer_max_bytes)
        tokenizer = train_tokenizer(tok_texts, shape.vocab, args.seq_len)
        phases["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_stream = encode_stream(tokenizer, corpus.train)
    val_stream = encode_stream(tokenizer, corpus.validation)
    phases["encode_s"] = time.perf_counter() - t
    setup = (f"{phases['load_s']:.1f}s loading the run's state" if args.resume
             else f"{phases['tokenizer_s']:.1f}s tokenizer")
    log(
        f"tokens: {len(train_stream):,} train, {len(val_stream):,} validation "
        f"({setup}, {phases['encode_s']:.1f}s encode)"
    )
    corpus_id = {"fingerprint": corpus.fingerprint(), "train_tokens": len(train_stream)}
    corpus_matches = not state or state["corpus"] == corpus_id
    if not corpus_matches:
        log("warning: the corpus differs from the resumed run's; the data stream goes on "
            "from its generators' states but over other windows")

    model = build_model(shape, tokenizer, args.seq_len)
    if args.resume:
        restore_model(model, state_tensors, args.resume)
    model = model.to(device)
    params = n_params(model)
    log(f"model: {args.shape if not args.tiny else 'tiny'} shape, {params:,} parameters, "
        f"{args.seq_len}-token rows on {device}")
    batches = BatchMaker(train_stream, tokenizer, args, device)
    if args.resume:
        batches.restore(state["batches"], state_tensors["rng/corpus_windows"])
        log(f"resumed {args.resume} at step {state['steps']:,} ({state['tokens_seen']:,} "
            f"tokens, {state['train_s']:.0f}s of training in {len(state['calls'])} call(s))")
    args.time_budget_s = training_budget(args, t_start)
    schedule = plan(args, state)
    if schedule.progress(0, 0.0, 0.0) >= 1.0:
        log("warning: the run's schedule is complete: training at the floor learning rate "
            "(pass --total-time-budget-s or --total-steps to plan a longer run)")
    opt_state = {k: v for k, v in state_tensors.items() if k.startswith("optim/")} or None
    del state_tensors
    stats, opt = train(model, batches, args, device, schedule, opt_state)
    phases["train_s"] = stats["train_wall_s"]
    rows_seen, task_rows_seen = dict(batches.rows_seen), dict(batches.task_rows_seen)
    calls = state.get("calls", [])
    call = {
        "call": len(calls) + 1,
        "resumed_from": str(args.resume) if args.resume else None,
        "start_step": schedule.done_steps,
        "time_budget_s": args.time_budget_s,
        "max_steps": args.steps,
        **{k: stats[k] for k in ("steps", "tokens_seen", "train_wall_s", "first_step_s",
                                 "tokens_per_s", "compiled", "lr_first", "lr_last",
                                 "progress_end", "final_train_loss")},
        "corpus_matches": corpus_matches,
        "evaluated": not args.skip_eval,
    }
    run = {
        "steps": schedule.done_steps + stats["steps"],
        "tokens_seen": state.get("tokens_seen", 0) + stats["tokens_seen"],
        "train_s": round(schedule.done_train_s + stats["train_wall_s"], 2),
        "first_steps_s": round(schedule.done_first_steps_s + stats["first_step_s"], 2),
        "total_steps": schedule.total_steps,
        "total_time_budget_s": schedule.total_time_s,
        "recipe": recipe(args),
        "corpus": corpus_id,
        "calls": [*calls, call],
    }

    t = time.perf_counter()
    if args.save_state:  # before save()'s bf16 cast
        written = save_trainer_state(args.out, model, opt, batches, run)
    del opt
    model_bytes = save(model.cpu(), tokenizer, args.out, heldout, tokenizer_dir=args.resume)
    del model, batches
    metrics = {} if args.skip_eval else evaluate(args.out, val_stream, args, device)
    phases["eval_and_save_s" if metrics else "save_s"] = time.perf_counter() - t
    call["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    if args.save_state:
        write_state_json(args.out, written)  # again, with this call's wall time

    report = {  # this call's statistics, but steps, tokens and training time of the whole run
        **{k: v for k, v in stats.items() if k not in ("lr_first", "lr_last", "progress_end")},
        "steps": run["steps"],
        "tokens_seen": run["tokens_seen"],
        "train_wall_s": run["train_s"],
        "call_steps": stats["steps"],
        "evaluated": bool(metrics),
        **metrics,
        "parameters": params,
        "model_file_bytes": model_bytes,
        "model_file_mb": round(model_bytes / 2**20, 2),
        "shape": "tiny" if args.tiny else args.shape,
        "model_shape": asdict(shape),
        "max_position_embeddings": args.seq_len,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "needle_share": args.needle_share,
        "needle_boost_share": args.needle_boost_share,
        "needle_boost_frac": args.needle_boost_frac,
        "long_needle_share": args.long_needle_share,
        "task_share": args.task_share,
        "rows_seen": rows_seen,
        "task_rows_seen": task_rows_seen,
        "answer_loss_weight": args.answer_loss_weight,
        "peak_lr": args.lr,
        "time_budget_s": args.time_budget_s,
        "wall_budget_s": args.wall_budget_s,
        "max_steps": args.steps,
        "total_time_budget_s": schedule.total_time_s,
        "total_steps": schedule.total_steps,
        "calls": run["calls"],
        "seed": args.seed,
        "tiny": args.tiny,
        "corpus": {
            "include_site_packages": args.include_site_packages,
            "max_bytes": args.corpus_max_bytes,
            "files": len(corpus.files),
            "bytes": corpus.n_bytes,
            "train_tokens": int(len(train_stream)),
            "validation_tokens": int(len(val_stream)),
            "fingerprint": corpus.fingerprint(),
            "epochs_seen": round(run["tokens_seen"] / max(len(train_stream), 1), 3),
        },
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "wall_time_s": call["wall_time_s"],
        **environment(device),
        "command_line": shlex.join(
            [sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])]
        ),
    }
    (args.out / reference.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    scores = (f"val ppl {metrics['val_perplexity']}, needle mean "
              f"{metrics['needle_accuracy_mean']}" if metrics else "not evaluated (--skip-eval)")
    log(f"wrote {args.out} ({report['model_file_mb']} MB weights) in {report['wall_time_s']}s, "
        f"step {run['steps']:,} of the run (call {call['call']}): {scores}")
    return report


def plan(args: argparse.Namespace, state: dict[str, Any]) -> Schedule:
    """The run's schedule: totals given on the command line, else the resumed run's, else this
    call's own budget (a single call, as before resuming existed)."""
    if args.total_steps is not None or args.total_time_budget_s is not None:
        totals = (args.total_steps, args.total_time_budget_s)
        if state and totals != (state["total_steps"], state["total_time_budget_s"]):
            log(f"schedule totals changed to steps {totals[0]}, seconds {totals[1]} (run: "
                f"{state['total_steps']}, {state['total_time_budget_s']})")
    elif state:
        totals = (state["total_steps"], state["total_time_budget_s"])
    else:
        totals = (args.steps, args.time_budget_s)
    if not state:
        return Schedule(*totals)
    return Schedule(*totals, state["steps"], state["train_s"], state["first_steps_s"])


if __name__ == "__main__":
    main()
