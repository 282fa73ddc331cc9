"""Loading kvpatch's own reference model, offline, from files shipped inside the package.

No model hub is reachable where kvpatch is developed and tested, so every fidelity number is
measured on a small Llama that kvpatch trains itself (`tools/train_reference_lm.py`). Its files
live in `kvpatch/models/<name>/`; loading never touches the network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..data.needle import encode
from ..errors import KVPatchError
from .folder import load_folder, missing_parts

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_NAME = "kvpatch-ref"
KNOWN_NAMES = (DEFAULT_NAME,)
HELDOUT_FILE = "heldout.txt"
REPORT_FILE = "training_report.json"
TRAIN_COMMAND = (
    "python tools/train_reference_lm.py --out kvpatch/models/kvpatch-ref --device cuda "
    "--include-site-packages --time-budget-s 420"
)


class ReferenceModelMissingError(KVPatchError, FileNotFoundError):
    """The reference model's files are not where kvpatch looks for them."""


def model_dir(name: str | os.PathLike[str] = DEFAULT_NAME) -> Path:
    """Directory of a shipped model name, or `name` itself when it is an existing directory."""
    path = Path(name)
    if path.is_dir():
        return path
    if str(name) in KNOWN_NAMES or not any(sep in str(name) for sep in ("/", os.sep)):
        return MODELS_DIR / str(name)
    return path


def _check_files(directory: Path, name: str | os.PathLike[str]) -> None:
    missing = missing_parts(directory)
    if not missing:
        return
    raise ReferenceModelMissingError(
        f"model '{name}' is not available: {directory} lacks {', '.join(missing)}. "
        "Pass a folder written by `save_pretrained` (single-file or sharded weights), or train "
        f"kvpatch's own reference model with `{TRAIN_COMMAND}` "
        "(about 10 minutes on one GPU; `--tiny --device cpu` makes a toy one in seconds)."
    )


def available() -> list[str]:
    """Names of the shipped models whose files are present."""
    names = (d.name for d in MODELS_DIR.iterdir() if d.is_dir())
    return sorted(n for n in names if not missing_parts(MODELS_DIR / n))


def load(
    name: str | os.PathLike[str] = DEFAULT_NAME,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a shipped reference model or of any model directory transformers
    loads (single-file or sharded weights), in eval mode; `dtype` as in `folder.load_folder`."""
    directory = model_dir(name)
    _check_files(directory, name)
    return load_folder(directory, device, dtype)


def heldout_text(name: str | os.PathLike[str] = DEFAULT_NAME) -> str:
    """The held-out text shipped with a model, so perplexity is computed on the same bytes
    everywhere (the corpus itself depends on the local Python version)."""
    directory = model_dir(name)
    path = directory / HELDOUT_FILE
    if not path.is_file():
        _check_files(directory, name)
        raise ReferenceModelMissingError(f"{path} is missing; retrain or recopy the model files")
    return path.read_text(encoding="utf-8")


def training_report(name: str | os.PathLike[str] = DEFAULT_NAME) -> dict[str, Any]:
    path = model_dir(name) / REPORT_FILE
    if not path.is_file():
        raise ReferenceModelMissingError(f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


@torch.no_grad()
def perplexity(
    model: Any,
    token_ids: list[int] | torch.Tensor,
    seq_len: int = 1024,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> float:
    """Perplexity over non-overlapping `seq_len` windows of one token stream (tail dropped).

    Each window is scored on its own with no carried context, so the number depends only on the
    ids, the window length and the model: the protocol the training report and fidelity checks
    share.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"{ids.numel()} tokens is less than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)


def heldout_perplexity(
    model: Any,
    tokenizer: Any,
    name: str | os.PathLike[str] = DEFAULT_NAME,
    seq_len: int = 1024,
    batch_size: int = 8,
) -> float:
    """Perplexity of `model` on the held-out text shipped with reference model `name`."""
    ids = encode(tokenizer, heldout_text(name))
    return perplexity(model, ids, seq_len=seq_len, batch_size=batch_size)
