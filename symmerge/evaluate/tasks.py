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
    elif spec.endswith(".npz"):
        return _npz_calibration(Path(spec), model_dir, examples=examples, batch_size=batch_size, labels=labels)
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


def _npz_calibration(path: Path, model_dir: Path, *, examples: int, batch_size: int, labels: bool) -> list[dict[str, torch.Tensor]]:
    """An .npz as documented in :mod:`symmerge.data`: integer ``inputs`` are token ids (``input_ids`` +
    ``attention_mask``) for text models, float ``inputs`` are ``pixel_values`` for image models."""
    import json

    from symmerge.data import load_calibration

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    image_model = any(k in config for k in ("image_size", "num_channels"))
    batches = load_calibration(path, model_dir=model_dir, main_input_name="pixel_values" if image_model else "input_ids",
                               num_examples=examples, batch_size=batch_size)
    if "input_ids" in batches[0]:
        vocab = config.get("vocab_size")
        positions = config.get("n_positions") or config.get("max_position_embeddings")
        top = max(int(b["input_ids"].max()) for b in batches)
        if isinstance(vocab, int) and top >= vocab:
            raise SymmergeError(f"{path}: 'inputs' holds token id {top}, but the model's vocabulary has {vocab} tokens "
                                f"(ids 0..{vocab - 1}): tokenise with the model's own tokenizer")
        length = batches[0]["input_ids"].shape[1]
        if isinstance(positions, int) and length > positions:
            raise SymmergeError(f"{path}: 'inputs' has {length} tokens per example, but the model takes at most "
                                f"{positions}: cut the examples to {positions} tokens")
    if not labels:
        return [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    classifier = any(str(a).endswith(("ForSequenceClassification", "ForImageClassification"))
                     for a in config.get("architectures") or [])
    if "input_ids" in batches[0] and not classifier:  # a language model: the model shifts the labels itself
        for b in batches:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    elif "labels" not in batches[0]:
        raise SymmergeError(f"{path}: learned matching of a classifier needs 'labels' (one class per example) in the .npz")
    return batches
