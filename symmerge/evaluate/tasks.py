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

from symmerge.data.calibration import model_config, read_npz
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
    config = model_config(model_dir)
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    context = min(max_length, positions) if isinstance(positions, int) and positions > 0 else max_length
    if path.suffix == ".npz":
        arrays = read_npz(path)
        if "inputs" not in arrays:
            raise SymmergeError(f"{path} has no array named 'inputs' (it has {', '.join(arrays) or 'no arrays'})")
        inputs, labels = arrays["inputs"], arrays.get("labels")
        if not (np.issubdtype(inputs.dtype, np.integer) or np.issubdtype(inputs.dtype, np.floating)):
            raise SymmergeError(f"{path}: 'inputs' has dtype {inputs.dtype}: save integer token ids or float images")
        if labels is not None:
            if inputs.ndim == 0 or labels.ndim != 1 or len(labels) != len(inputs) or len(labels) == 0:
                raise SymmergeError(f"{path}: 'labels' has shape {labels.shape} and 'inputs' {inputs.shape}: a classifier "
                                    "needs one integer label per example")
            if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise SymmergeError(f"{path}: 'labels' must be class numbers 0, 1, ... (got dtype {labels.dtype})")
            return _fitting(partial(evaluate_classifier, images=torch.from_numpy(inputs).float(), labels=torch.from_numpy(labels).long()), path)
        if np.issubdtype(inputs.dtype, np.floating):
            raise SymmergeError(f"{path}: float inputs need labels (a classifier); integer inputs alone are LM tokens")
        tokens = torch.from_numpy(inputs).long().reshape(-1)
        _check_tokens(path, tokens, context, config)
        return _fitting(partial(evaluate_lm, tokens=tokens, context=context, windows=windows), path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SymmergeError(f"--data {spec}: a text file is tokenised with the model's tokenizer, and {model_dir} has none ({type(e).__name__})") from None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SymmergeError(f"cannot read --data {path} ({e.strerror or e})") from None
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    _check_tokens(path, tokens, context, config)
    return _fitting(partial(evaluate_lm, tokens=tokens, context=context, windows=windows), path)


def _check_tokens(path: Path, tokens: torch.Tensor, context: int, config: dict) -> None:
    """Enough token ids for a window of ``context`` + 1, each inside the model's vocabulary, or a one-line error."""
    if len(tokens) <= context + 1:
        raise SymmergeError(f"{path} holds only {len(tokens)} tokens: too few for windows of {context}")
    vocab = config.get("vocab_size")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or isinstance(vocab, int) and high >= vocab:
        raise SymmergeError(f"{path}: token ids run from {low} to {high}, but the model's vocabulary has "
                            f"{vocab} tokens: tokenise with the model's own tokenizer")


def _fitting(evaluate: Evaluator, path: Path) -> Evaluator:
    """``evaluate``, with the errors a model raises on inputs it cannot take (images of another size, class numbers
    past its labels) turned into a one-line error naming the data file."""
    def run(model):
        try:
            return evaluate(model)
        except (IndexError, ValueError, RuntimeError) as e:
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise SymmergeError(f"--data {path} does not fit the model ({reason}): give the inputs and labels it was "
                                "trained on") from None
    return run
