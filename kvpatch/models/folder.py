"""Loading any local model folder that transformers itself loads (single-file or sharded
weights, any dtype), offline, with an error that names what a folder lacks.

Kept apart from the shipped reference model (`reference.py`): this knows nothing of kvpatch's
own files, only of the folder layouts `save_pretrained` writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: The weight layouts `from_pretrained` reads without extra arguments: one file, or shards
#: (`model-0000x-of-0000y.safetensors`) listed by an index.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Files any one of which lets `AutoTokenizer` build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
#: `--dtype` names; "auto" keeps the dtype the folder's config.json records.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def missing_parts(directory: Path) -> list[str]:
    """What `directory` lacks to be loadable (empty when it has a config, weights and a tokenizer)."""
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return missing


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype (or "auto") from a `--dtype` name; None stays None (the device's default)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls there are slow and less exact); bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_folder(
    directory: str | os.PathLike[str], device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder, in eval mode on `device` (default CPU) in `dtype`
    (a torch dtype, a `DTYPES` name, or None for `default_dtype(device)`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else torch.device("cpu")
    chosen = parse_dtype(dtype) or default_dtype(dev)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=chosen)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.to(dev).eval(), tokenizer
