"""Batched evaluation of zoo models: pure functions of (model, data), for training reports and loss barriers.

Both leave the model as they found it (train/eval mode restored, no gradients kept) and sum losses in float64,
so the result does not depend on the batch size beyond float32 rounding inside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _evaluating:
    """Context: eval mode and no gradients, restoring the module's mode on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def evaluate_classifier(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict:
    """Mean cross-entropy (nats) and accuracy of an image classifier (an HF model taking ``pixel_values``).

    images (N, C, H, W) float, labels (N,) int64 → {"loss": float, "accuracy": float in [0, 1]}.
    """
    total_loss, correct = 0.0, 0
    with _evaluating(model):
        for start in range(0, len(labels), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            logits = model(pixel_values=x).logits                                # (B, classes)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double().item()
            correct += int((logits.argmax(-1) == y).sum())
    return {"loss": total_loss / len(labels), "accuracy": correct / len(labels)}


def lm_windows(tokens: torch.Tensor, context: int, windows: int) -> torch.Tensor:
    """(windows, context + 1) ids: ``windows`` evenly spaced (non-overlapping where the text is long enough)
    slices of ``tokens``, from the start to the end; deterministic, no randomness."""
    last_start = len(tokens) - (context + 1)
    if last_start < 0:
        raise ValueError(f"{len(tokens)} tokens are too few for a window of {context + 1}")
    starts = torch.linspace(0, last_start, windows).long()                       # (windows,)
    return tokens[starts[:, None] + torch.arange(context + 1)]


def evaluate_lm(model, tokens: torch.Tensor, context: int, windows: int = 128, batch_size: int = 32) -> dict:
    """Mean next-token cross-entropy (nats per character) of a causal LM (an HF model taking ``input_ids``) over
    ``windows`` fixed windows of ``context`` + 1 ids from ``tokens`` (N,), every position of every window counted.

    → {"loss": float}.
    """
    chunks = lm_windows(tokens, context, windows)                               # (W, T + 1)
    total_loss = 0.0
    with _evaluating(model):
        for start in range(0, len(chunks), batch_size):
            chunk = chunks[start:start + batch_size]
            logits = model(input_ids=chunk[:, :-1]).logits                       # (B, T, vocab)
            total_loss += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").double().item()
    return {"loss": total_loss / chunks[:, 1:].numel()}
