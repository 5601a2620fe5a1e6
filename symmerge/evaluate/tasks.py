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

Evaluator = Callable[[torch.nn.Module], dict]


def make_evaluator(spec: str, model_dir: Path, *, max_length: int = 128, windows: int = 64) -> Evaluator:
    from symmerge.zoo.evaluate import evaluate_classifier, evaluate_lm

    if spec == "zoo":
        from symmerge.zoo.registry import evaluation_data, read_record

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
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise SymmergeError(f"--data {spec}: a text file is tokenised with the model's tokenizer, and {model_dir} has none ({type(e).__name__})") from None
    tokens = torch.tensor(tokenizer(path.read_text())["input_ids"], dtype=torch.long)
    if len(tokens) <= max_length + 1:
        raise SymmergeError(f"{path} holds only {len(tokens)} tokens: too few for windows of {max_length}")
    return partial(evaluate_lm, tokens=tokens, context=max_length, windows=windows)


def calibration_inputs(spec: str, model_dir: Path, *, examples: int = 256, max_length: int = 128, batch_size: int = 32,
                       labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Model-input batches for activation statistics, from the same specs as :func:`make_evaluator`: ``zoo`` (the
    zoo model's *training* images or text, never the held-out data its scores come from), an ``.npz``
    (``inputs``) or a text file (tokenised windows)."""
    if spec == "zoo":
        from symmerge.zoo.data import load_digits, load_fashion_mnist, load_shakespeare
        from symmerge.zoo.registry import read_record

        record = read_record(model_dir)
        if record["task"] == "image-classification":
            split = load_digits() if record["dataset"] == "digits" else load_fashion_mnist()
            data = {"images": split.train_images, "labels": split.train_labels}
        else:
            data = {"tokens": load_shakespeare().train, "context": record["recipe"]["context"], "windows": examples}
    else:
        data = make_evaluator(spec, model_dir, max_length=max_length, windows=examples).keywords
    if "images" in data:
        inputs = data["images"][:examples]
        batches = [{"pixel_values": inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)]
        if labels and "labels" in data:
            for i, b in enumerate(batches):
                b["labels"] = data["labels"][i * batch_size:(i + 1) * batch_size]
        return batches
    from symmerge.zoo.evaluate import lm_windows

    windows = lm_windows(data["tokens"], data["context"], min(examples, data["windows"]))[:, :-1]
    batches = [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]
    if labels:  # causal LM: the model shifts the labels itself
        for b in batches:
            b["labels"] = b["input_ids"]
    return batches
