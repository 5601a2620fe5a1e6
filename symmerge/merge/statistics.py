"""Statistics from data for Fisher merging and RegMean, computed on a live model (the *aligned* one).

- :func:`fisher_diagonal`: ``F = E_x[(∇_θ log p(y|x))²]`` per parameter, from per-example gradients (the proper
  diagonal Fisher; the dataless-model-merging code squares the batch-mean gradient instead).
- :func:`input_grams`: ``G = XᵀX / N`` of the inputs of every linear layer (RegMean, Jin et al. 2023), counting
  only real tokens when the batch has an attention mask (the reference code counts padding too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _example_loss(model: torch.nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Empirical Fisher with labels; otherwise next-token NLL (causal LMs) or the NLL of the predicted class."""
    inputs = {k: v for k, v in example.items() if k != "labels"}
    if "labels" in example:
        return model(**inputs, labels=example["labels"]).loss
    out = model(**inputs)
    logits = out.logits
    if logits.ndim == 3 and "input_ids" in inputs:  # causal LM: predict each next token of the example itself
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    predicted = logits.argmax(-1).detach()
    return F.cross_entropy(logits.float(), predicted)


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-parameter diagonal Fisher (float32, same shapes as the parameters), averaged over examples."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="Fisher", unit="batch", disable=not progress, leave=False):
            n = next(iter(batch.values())).shape[0]
            for i in range(n):  # per-example gradients: the Fisher is a mean of squares, not a square of means
                example = {k: v[i:i + 1] for k, v in batch.items()}
                model.zero_grad(set_to_none=True)
                _example_loss(model, example).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name].add_(p.grad.detach().float().square())
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: f / max(count, 1) for name, f in fisher.items()}


@torch.no_grad()
def input_grams(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{weight key: XᵀX / N}`` (in×in, float32) for every ``nn.Linear`` and GPT-2 ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def fn(module, inputs, output):
            x = inputs[0].detach().double()
            m = mask[0]
            if m is not None and x.ndim == 3 and x.shape[:2] == m.shape:
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [module.register_forward_hook(hook(f"{name}.weight")) for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D))]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="Gram matrices", unit="batch", disable=not progress, leave=False):
            mask[0] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: (s / max(counts[name], 1)).float() for name, s in sums.items()}
