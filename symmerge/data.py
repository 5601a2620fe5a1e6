"""Calibration sets given by the user, for Fisher merging, RegMean and activation matching.

A text file holds one example per line, tokenised with the model's tokenizer; an ``.npz`` holds an array
``inputs`` (integer token ids, or float model inputs such as images) and optionally ``labels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from symmerge.errors import SymmergeError


def load_calibration(path: str | Path, *, model_dir: Path | None = None, main_input_name: str = "input_ids", max_length: int = 128,
                     num_examples: int = 256, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Model-input batches (``input_ids`` + ``attention_mask``, or ``main_input_name``; ``labels`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise SymmergeError(f"calibration data {path} does not exist")
    if path.suffix == ".npz":
        return _npz_batches(path, main_input_name, num_examples, batch_size)
    return _text_batches(path, model_dir, max_length, num_examples, batch_size)


def _npz_batches(path: Path, main_input_name: str, num_examples: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise SymmergeError(f"{path} is not a readable .npz ({e})") from None
    if "inputs" in data.files:
        inputs = data["inputs"]
    elif len(data.files) == 1:
        inputs = data[data.files[0]]
    else:
        raise SymmergeError(f"{path} has no array named 'inputs' (it has {', '.join(data.files)})")
    labels = data["labels"] if "labels" in data.files else None
    if len(inputs) == 0:
        raise SymmergeError(f"{path}: 'inputs' is empty")
    if labels is not None and len(labels) != len(inputs):
        raise SymmergeError(f"{path}: {len(labels)} labels for {len(inputs)} inputs")
    inputs = torch.from_numpy(np.ascontiguousarray(inputs[:num_examples]))
    batches = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        if chunk.dtype.is_floating_point:
            batch = {main_input_name: chunk.float()}
        else:
            batch = {"input_ids": chunk.long(), "attention_mask": torch.ones_like(chunk, dtype=torch.long)}
        if labels is not None:
            batch["labels"] = torch.from_numpy(np.asarray(labels[start:start + batch_size])).long()
        batches.append(batch)
    return batches


def _text_batches(path: Path, model_dir: Path | None, max_length: int, num_examples: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()][:num_examples]
    if not lines:
        raise SymmergeError(f"{path} holds no non-empty line")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SymmergeError(f"a text calibration file is tokenised with the model's tokenizer, and {model_dir} has none ({type(e).__name__})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(lines), batch_size):
        enc = tokenizer(lines[start:start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
