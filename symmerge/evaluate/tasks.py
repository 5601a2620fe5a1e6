"""What a model is evaluated on: a data spec turned into ``evaluate(model) -> {"loss", ["accuracy"]}``.

Specs: ``zoo`` (the task and held-out data a zoo model was trained for, read from its zoo.json), a text file (causal
LM: mean next-token loss on fixed windows, tokenised with the model's tokenizer), or an ``.npz`` (``inputs`` with
``labels`` for a classifier; integer ``inputs`` alone for a causal LM).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from symmerge.errors import SymmergeError
from symmerge.lazy import lazy_module
from symmerge.zoo.evaluate import evaluate_classifier, evaluate_lm
from symmerge.zoo.registry import evaluation_data, read_record

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py

Evaluator = Callable[[torch.nn.Module], dict]


def make_evaluator(spec: str, model_dir: Path, *, max_length: int = 128, windows: int = 64) -> Evaluator:
    if spec == "zoo":
        if not (model_dir / "zoo.json").is_file():
            raise SymmergeError(f"--data zoo needs a zoo model (with zoo.json); {model_dir} is not one: give a .txt or .npz")
        record = read_record(model_dir)
        fn = evaluate_classifier if record["task"] == "image-classification" else evaluate_lm
        return partial(fn, **evaluation_data(record))
    path = Path(spec)
    if not path.is_file():
        raise SymmergeError(f"--data {spec}: no such file (give zoo, a text file or an .npz)")
    if path.suffix == ".npz":
        data = np.load(path)
        if "inputs" not in data:
            raise SymmergeError(f"{path} has no array named 'inputs' (it has {', '.join(data.files)})")
        inputs = torch.from_numpy(data["inputs"])
        if "labels" in data:
            return partial(evaluate_classifier, images=inputs.float(), labels=torch.from_numpy(data["labels"]).long())
        if inputs.dtype.is_floating_point:
            raise SymmergeError(f"{path}: float inputs need labels (a classifier); integer inputs alone are LM tokens")
        return partial(evaluate_lm, tokens=inputs.long().reshape(-1), context=max_length, windows=windows)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SymmergeError(f"--data {spec}: a text file is tokenised with the model's tokenizer, and {model_dir} has none ({type(e).__name__})") from None
    tokens = torch.tensor(tokenizer(path.read_text())["input_ids"], dtype=torch.long)
    if len(tokens) <= max_length + 1:
        raise SymmergeError(f"{path} holds only {len(tokens)} tokens: too few for windows of {max_length}")
    return partial(evaluate_lm, tokens=tokens, context=max_length, windows=windows)
