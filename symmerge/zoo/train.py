"""Training the zoo's models from scratch, deterministically, on a CPU core.

Everything random comes from the seed: the initial weights (``torch.manual_seed``) and the order of the batches
(a ``torch.Generator``). With the same seed, thread count and library versions a run is reproduced bit for bit on one machine; on another
CPU the float kernels may differ, and 2-thread ViT training then ends in other models (vit-fmnist-w256 retrained on
a fresh host: 84.44 / 83.93 % against 84.19 / 84.06 %; the 1-thread GPT-2 reproduced its losses). Benchmarks that
compare rows must measure them on one cached pair.
Each run writes a Hugging Face directory (config.json + model.safetensors) and ``zoo.json``, the recipe and the
final scores; zoo.json is written last, so a directory with it is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from symmerge.lazy import lazy_module
from symmerge.zoo.data import load_digits, load_fashion_mnist, load_shakespeare
from symmerge.zoo.evaluate import evaluate_classifier, evaluate_lm

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py

ZOO_JSON = "zoo.json"

VIT_DEFAULTS = {
    "digits": dict(layers=4, hidden=64, heads=4, mlp=128, patch=2, epochs=30, batch_size=64, lr=3e-3, train_size=None),
    "fashion_mnist": dict(layers=4, hidden=128, heads=4, mlp=256, patch=7, epochs=3, batch_size=128, lr=1.5e-3, train_size=40000),
}
WEIGHT_DECAY = 0.05
GRAD_CLIP = 1.0


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: leave as is), restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _optimizer(model: torch.nn.Module, lr: float, steps: int):
    """AdamW (weight decay on matrices only) with a one-cycle learning-rate schedule over ``steps`` steps."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": vectors, "weight_decay": 0.0}], lr=lr)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)


def _step(model, opt, schedule, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    schedule.step()


def _save(model, out_dir: Path, record: dict, progress: bool) -> Path:
    out_dir = Path(out_dir)
    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    (out_dir / ZOO_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def vit_recipe(dataset: str, **given) -> dict:
    """The hyperparameters of a ViT run on ``dataset``: ``given`` over the dataset's defaults (``VIT_DEFAULTS``;
    a value of None takes the default)."""
    if dataset not in VIT_DEFAULTS:
        raise ValueError(f"dataset must be one of {sorted(VIT_DEFAULTS)}, not {dataset!r}")
    unknown = set(given) - set(VIT_DEFAULTS[dataset])
    if unknown:
        raise ValueError(f"unknown ViT hyperparameters: {', '.join(sorted(unknown))}")
    return {k: given[k] if given.get(k) is not None else default for k, default in VIT_DEFAULTS[dataset].items()}


def vit_config(hp: dict, image_size: int, class_names: Sequence[str]) -> transformers.ViTConfig:
    """The ``ViTConfig`` of recipe ``hp`` for one-channel ``image_size`` images and ``class_names`` labels."""
    return transformers.ViTConfig(
        image_size=image_size, patch_size=hp["patch"], num_channels=1, num_labels=len(class_names),
        num_hidden_layers=hp["layers"], hidden_size=hp["hidden"], num_attention_heads=hp["heads"], intermediate_size=hp["mlp"],
        id2label=dict(enumerate(class_names)), label2id={name: i for i, name in enumerate(class_names)},
    )


def char_gpt2_config(vocab: Sequence[str], *, layers: int, hidden: int, heads: int, context: int) -> transformers.GPT2Config:
    """The ``GPT2Config`` of a character model over ``vocab``: MLP width 4 × ``hidden``, no dropout, newline as BOS/EOS."""
    return transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=context, n_embd=hidden, n_layer=layers, n_head=heads,
        n_inner=4 * hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=vocab.index("\n"), eos_token_id=vocab.index("\n"),
    )


def train_vit(
    dataset: str,
    seed: int,
    out_dir: Path,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    mlp: int | None = None,
    patch: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    train_size: int | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Train a ``ViTForImageClassification`` on ``dataset`` ("digits" or "fashion_mnist") from ``seed`` and save it
    to ``out_dir``; arguments left as None take the dataset's defaults (``VIT_DEFAULTS``). ``train_size`` keeps a
    fixed subset of Fashion-MNIST's training images. Returns ``out_dir``."""
    hp = vit_recipe(dataset, layers=layers, hidden=hidden, heads=heads, mlp=mlp, patch=patch, epochs=epochs, batch_size=batch_size, lr=lr,
                    train_size=train_size)
    data = load_digits() if dataset == "digits" else load_fashion_mnist(train_size=hp["train_size"])
    with _torch_threads(threads):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(vit_config(hp, data.image_size, data.class_names))
        n = len(data.train_labels)
        batches_per_epoch = math.ceil(n / hp["batch_size"])
        steps = hp["epochs"] * batches_per_epoch
        opt, schedule = _optimizer(model, hp["lr"], steps)
        shuffle = torch.Generator().manual_seed(seed)

        model.train()
        start = time.perf_counter()
        with tqdm(total=steps, desc=f"vit {dataset} seed {seed}", disable=not progress, leave=False) as bar:
            for epoch in range(hp["epochs"]):
                order = torch.randperm(n, generator=shuffle)
                for batch in order.split(hp["batch_size"]):
                    logits = model(pixel_values=data.train_images[batch]).logits    # (B, classes)
                    loss = F.cross_entropy(logits, data.train_labels[batch])
                    _step(model, opt, schedule, loss)
                    bar.update()
                    if bar.n % 10 == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)  # drawn with the next update
        seconds = time.perf_counter() - start
        test = evaluate_classifier(model, data.test_images, data.test_labels)
    record = {
        "task": "image-classification", "architecture": "vit", "dataset": dataset, "seed": seed, "recipe": hp,
        "optimizer": {"name": "AdamW", "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "schedule": "OneCycleLR"},
        "threads": torch.get_num_threads() if threads is None else threads, "steps": steps,
        "train_examples": n, "test_examples": len(data.test_labels),
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "train_seconds": round(seconds, 2),
    }
    return _save(model, out_dir, record, progress)


def sample_batch(tokens: torch.Tensor, context: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``tokens`` (N,): inputs (B, T) and next-token targets (B, T), with T = ``context``."""
    starts = torch.randint(len(tokens) - context, (batch_size,), generator=generator)
    chunk = tokens[starts[:, None] + torch.arange(context + 1)]                   # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def train_char_gpt2(
    seed: int,
    out_dir: Path,
    *,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    context: int = 128,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    val_windows: int = 128,
    threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Train a character-level ``GPT2LMHeadModel`` on Shakespeare for a fixed number of ``steps`` from ``seed`` and
    save it to ``out_dir``; zoo.json keeps the character vocabulary and the validation loss (nats/char) over
    ``val_windows`` fixed windows of the validation split. Returns ``out_dir``."""
    corpus = load_shakespeare()
    hp = dict(layers=layers, hidden=hidden, heads=heads, context=context, steps=steps, batch_size=batch_size, lr=lr, val_windows=val_windows)
    with _torch_threads(threads):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(char_gpt2_config(corpus.vocab, layers=layers, hidden=hidden, heads=heads, context=context))
        opt, schedule = _optimizer(model, lr, steps)
        batches = torch.Generator().manual_seed(seed)

        model.train()
        start = time.perf_counter()
        with tqdm(total=steps, desc=f"char-gpt2 seed {seed}", disable=not progress, leave=False) as bar:
            for step in range(steps):
                inputs, targets = sample_batch(corpus.train, context, batch_size, batches)
                logits = model(input_ids=inputs).logits                             # (B, T, vocab)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                _step(model, opt, schedule, loss)
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn with the next update
        seconds = time.perf_counter() - start
        val = evaluate_lm(model, corpus.val, context, val_windows)
    record = {
        "task": "char-lm", "architecture": "gpt2", "dataset": "shakespeare", "seed": seed, "recipe": hp,
        "optimizer": {"name": "AdamW", "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "schedule": "OneCycleLR"},
        "threads": torch.get_num_threads() if threads is None else threads, "steps": steps,
        "vocab": corpus.vocab, "train_chars": len(corpus.train), "val_chars": len(corpus.val),
        "val_loss": val["loss"], "uniform_loss": math.log(len(corpus.vocab)), "train_seconds": round(seconds, 2),
    }
    return _save(model, out_dir, record, progress)
