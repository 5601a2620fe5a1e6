"""Learned matching: tune the alignment so that the linear path ``(1 − t) θ_A + t T(θ_B)`` has low loss on
calibration data (Git Re-Basin's straight-through estimator for the discrete parts; cf. Theus et al. 2025, GLMC).

Starts from weight matching (residual map included) and learns every continuous part on its group manifold:

- the residual map as ``Q = Q₀ exp(K)``, ``K`` skew-symmetric (and ``K 1 = 0`` for pre-LN LayerNorm models, so
  ``Q`` keeps fixing the all-ones direction): exactly orthogonal at every step;
- per KV head, the full GL(d_h) of attention where both a rotation class and ``scale`` are chosen:
  ``A = A₀ exp(X)`` (``A₀`` = weight matching's rotation × scale), Q side ``A^T``, K side ``A^{-1}``; V side
  ``B^T``, O side ``B^{-T}``; with a rotation class alone, ``A = R₀ exp(X − X^T)``; RoPE heads keep a block
  rotation per plane (straight-through projection), per-head q/k norms keep QK fixed;
- FFN permutations (and post-LN residual permutations) by an exact LAP on latent scores with straight-through
  gradients. Head permutations stay as weight matching found them.

Each step evaluates one calibration batch at one point of the path (``t ~ U(0.2, 0.8)``, the default
``path="random"``, which lowers the whole path; or ``t = 1/2`` with ``path="midpoint"``) and descends ``step_loss``
— in :func:`match_learned`, by default, the cross-entropy to the endpoints' mean prediction ``(p_A + p_B) / 2``
(:func:`soft_target_loss`) instead of the labels; Adam (``lr`` 1e-2) with a linear warm-up over 20 steps and a
cosine decay over the budget. The *objective* is the mean loss (with the labels) over the held-out
calibration batches (every 4th, when there are 4 or more; else all) at fixed points of the path
(``t = 1/2``; ``t ∈ {1/4, 1/2, 3/4}`` for ``path="random"``); it is evaluated at the start (weight matching),
every ``eval_every`` steps (under a seconds budget: at most MAX_EVALUATION_SHARE of the time) and at the end, and
the best element evaluated is returned: never worse than the start
by the objective. A step that overflows, or makes a learned head factor too ill-conditioned for float32 weights to
keep B's function, is undone: the best element is restored, Adam's moments reset and the rate halved (with a
warm-up). Budgets: ``steps`` and ``seconds``, whichever ends first.

Why soft targets and this rate (benchmarks/results/learned_matching_sweep.md, 200 steps, test midpoint barrier):
with the labels, no rate suited both small ViT pairs — 1e-2 to 6e-2 with a warm-up beat 3e-3 on digits (far
start: 0.076–0.088 against 0.194) but threw Fashion-MNIST (near start) out of its basin (0.100–0.160 against
0.089). There the per-batch gradient is mostly noise (its signal fraction ‖μ‖² / (‖μ‖² + tr Σ) at the start,
batches of 64, random t: 0.04–0.10 per group; digits 0.31–0.41): labels that both endpoints get wrong pull the
path toward the labels rather than toward the endpoints' function. Fitting the endpoints' mean prediction
raises that fraction 1.5–3× (0.09–0.18) for two forward passes per calibration batch, once, and then 1e-2 with
the warm-up wins on both: Fashion-MNIST 0.057 (seed 1: 0.054 against 0.101), digits 0.088 (400 steps: 0.056
against 0.088, 0.051 against 0.101). At equal steps it also lowers vit-fmnist-w256 (0.106 → 0.073, 200 steps)
and GPT-2 Shakespeare (0.117 → 0.107 at 40 steps, 0.096 → 0.080 at 100). Per-group rates, halving on a
plateau, a rate scaled by the measured signal fraction and an average of the iterates did not win (same file).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, apply_to_group
from symmerge.groups.heads import HeadTransform, block_diagonal, from_rope_order, plane_rotation_matrix, rope_order
from symmerge.groups.residual import apply_residual, fold_norms
from symmerge.io.hf import build_model, untied_config
from symmerge.match.fit import Fit, matcher
from symmerge.match.lap import solve_lap
from symmerge.match.procrustes import procrustes
from symmerge.match.weights import match_weights
from symmerge.spec import ModelSpec, StateView
from symmerge.spec.base import FFNGroup

PATHS = ("midpoint", "random")
TARGETS = ("soft", "labels")  # what the steps fit: the endpoints' mean prediction, or the calibration labels
LEARNING_RATE = 1e-2  # Adam's step on every latent and generator (before the warm-up and the cosine decay)
WARMUP_STEPS = 20  # linear warm-up at the start and after a restart: Adam's first steps are about lr per entry whatever the gradient
MAX_CONDITION = 100.0  # learned head factors beyond this lose ~2 of float32's 7 digits; the step is undone
# Under a seconds budget, intermediate objective evaluations may take at most this share of the time: on GPT-2 one
# evaluation (8 held-out batches × 3 points of the path) costs as much as ~10 steps, so evaluating every 25 steps
# spent ~30% of a 150 s budget on evaluations instead of steps (benchmarks/results/learned_matching_sweep.md).
MAX_EVALUATION_SHARE = 0.1
# A step's batch is cut from a calibration batch so that it scores at least this many positions, and no more
# examples than that needs: a language model's batch of 64 windows of 128 tokens scores 8192 positions (each
# gradient already averages thousands of predictions), a classifier's batch of 64 images scores 64, so cutting the
# first into four gives four steps for the cost of one at little more noise, while the second stays whole
# (benchmarks/results/learned_matching_sweep.md, "Steps by scored positions").
STEP_POSITIONS = 2048


def _schedule(done: float, since_restart: int, warmup: int) -> float:
    """The factor on the learning rate: a linear warm-up over the ``warmup`` steps after each (re)start, times a
    cosine decay over the fraction ``done`` of whichever budget (steps or seconds) runs out first."""
    return min(1.0, (since_restart + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _evaluation_due(step: int, eval_every: int, seconds: float | None, since_last: float, evaluation_seconds: float) -> bool:
    """Whether to evaluate the objective after ``step``: every ``eval_every`` steps; under a seconds budget only once
    the steps since the last evaluation took ``(1 − s)/s`` times as long as it did (``s`` = MAX_EVALUATION_SHARE), so
    evaluations stay within that share of the budget. A steps-only budget keeps the fixed schedule (reproducible)."""
    if step % eval_every:
        return False
    return seconds is None or since_last * MAX_EVALUATION_SHARE >= evaluation_seconds * (1 - MAX_EVALUATION_SHARE)


def _examples(batch: Mapping[str, Any]) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


def scored_positions(batch: Mapping[str, Any]) -> int:
    """How many predictions a batch's loss averages: every label that is not ``-100`` (a language model's tokens),
    one per example for a classifier's labels (or without labels)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() < 2 or labels.is_floating_point():
        return _examples(batch)
    return int((labels != -100).sum())


def step_batches(batches: list, positions: int = STEP_POSITIONS) -> list:
    """``batches`` with each cut into the most consecutive slices of equal size that still score ``positions``
    predictions each (:func:`scored_positions`); a batch scoring fewer than ``2 × positions`` stays whole. The
    examples and their order are unchanged: the steps only see them in smaller groups."""
    out = []
    for batch in batches:
        n = _examples(batch)
        pieces = max(1, min(n, scored_positions(batch) // positions))
        if pieces == 1:
            out.append(batch)
            continue
        size = math.ceil(n / pieces)
        out.extend({k: v[i:i + size] if isinstance(v, torch.Tensor) and len(v) == n else v for k, v in batch.items()}
                   for i in range(0, n, size))
    return out


def _straight_through(projected: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The projection's value with the latent's gradient (∂ projected / ∂ latent taken as the identity)."""
    return projected.detach() + latent - latent.detach()


def _project_planes(latent: torch.Tensor, rotary_dim: int = 0, interleaved: bool = False) -> torch.Tensor:
    """RoPE: the nearest element of the QK rotation group of (H, d_h, d_h) latents, straight through: the nearest
    rotation of each rotary plane and, with partial rotary (``rotary_dim`` < d_h), the nearest orthogonal matrix on
    the unrotated dimensions (the layout of :func:`~symmerge.groups.heads.rope_order`)."""
    with torch.no_grad():
        dh = latent.shape[-1]
        order = rope_order(dh, rotary_dim, interleaved).to(latent.device)
        c = latent[:, order][:, :, order]  # plane i is (i, i + r/2), the unrotated dimensions last
        rotated = rotary_dim or dh
        half = rotated // 2
        i = torch.arange(half, device=latent.device)
        blocks = torch.stack([torch.stack([c[:, i, i], c[:, i, i + half]], -1),
                              torch.stack([c[:, i + half, i], c[:, i + half, i + half]], -1)], -2)
        r = procrustes(blocks.double(), proper=True)
        q = plane_rotation_matrix(r[..., 0, 0], r[..., 1, 0])
        if rotated < dh:
            q = block_diagonal(q, procrustes(c[:, rotated:, rotated:].double()))
        q = from_rope_order(q, q.new_ones(q.shape[:2]), order)[0].to(latent.dtype)
    return _straight_through(q, latent)


def _permutation_matrix(latent: torch.Tensor) -> torch.Tensor:
    """Straight-through dense permutation ``P`` (``P[j, perm[j]] = 1``) from an exact LAP on the latent scores."""
    perm = torch.from_numpy(solve_lap(latent.detach())).to(latent.device)  # the LAP runs on the CPU
    p = torch.zeros_like(latent)
    p[torch.arange(len(perm), device=latent.device), perm] = 1.0
    return _straight_through(p, latent)


def _one_hot(perm: torch.Tensor) -> torch.Tensor:
    scores = torch.zeros(len(perm), len(perm), device=perm.device)
    scores[torch.arange(len(perm), device=perm.device), perm] = 1.0
    return scores


def transform_to(transform: ModelTransform, device: torch.device | str) -> ModelTransform:
    """``transform`` with every tensor on ``device`` (rotations and scales keep their dtype)."""
    return replace(transform, residual=None if transform.residual is None else transform.residual.to(device),
                   ffn={k: v.to(device) for k, v in transform.ffn.items()},
                   heads={k: h.to(h.qk_rotation.dtype, device) for k, h in transform.heads.items()})


def _device_of(state: Mapping[str, Any]) -> torch.device:
    """Where a state dict's tensors are (the CPU for one without tensors)."""
    return next((v.device for v in state.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def tensors_to(tensors: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A state dict or calibration batch with every tensor on ``device`` (the same tensors when they are there)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _apply_ffn_dense(view: StateView, group: FFNGroup, p: torch.Tensor) -> None:
    """``W_in → P W_in``, ``b_in → P b_in``, ``W_out → W_out Pᵀ`` (the index form ``w[perm]`` as a product)."""
    for slot in group.inputs + group.input_biases:
        view.set(slot, p @ view.get(slot))
    for slot in group.outputs:
        view.set(slot, view.get(slot) @ p.T)


class _Parametrisation:
    """The learnable element: base matrices from weight matching, generators (zero at the start) and latents, all on
    ``device`` (where the model runs)."""

    def __init__(self, spec: ModelSpec, init: ModelTransform, symmetries: frozenset[str], learn_ffn: bool,
                 device: torch.device | str = "cpu"):
        init = transform_to(init, device)
        self.spec, self.init = spec, init
        self.params: dict[str, torch.Tensor] = {}
        self.residual_kind = spec.residual.kind if init.residual is not None else None
        if init.residual is not None:  # post-LN: latent scores (Q itself: its LAP is Q); else a skew generator
            self.params["residual"] = (init.residual.float().clone() if self.residual_kind == "permutation"
                                       else torch.zeros(init.residual.shape, device=device)).requires_grad_(True)
        if learn_ffn:
            for name, perm in init.ffn.items():
                self.params[f"ffn/{name}"] = _one_hot(perm).requires_grad_(True)
        self.kinds: dict[str, str] = {}
        self.attention = {group.name: group for group in spec.attention}
        for group in spec.attention:
            if group.name not in init.heads:
                continue
            x = init.heads[group.name]
            for side, cls in (("qk", "qk"), ("vo", "vo")):
                if side == "qk" and group.qk_fixed:
                    continue
                if side == "qk" and group.rope:
                    if "qk" in symmetries:
                        self.kinds[f"qk/{group.name}"] = "planes"
                        self.params[f"qk/{group.name}"] = x.qk_rotation.float().clone().requires_grad_(True)
                    continue
                if cls in symmetries and "scale" in symmetries:
                    kind = "general"
                elif cls in symmetries:
                    kind = "orthogonal"
                elif "scale" in symmetries:
                    kind = "diagonal"
                else:
                    continue
                self.kinds[f"{side}/{group.name}"] = kind
                n, dh = x.qk_scale.shape
                self.params[f"{side}/{group.name}"] = torch.zeros((n, dh) if kind == "diagonal" else (n, dh, dh), device=device).requires_grad_(True)
        # a rotation is its own inverse-transpose, so general=True (K, O sides by the inverse) covers every kind
        self.general = "general" in self.kinds.values()
        if init.residual is not None and self.residual_kind != "permutation":
            d = init.residual.shape[0]
            self.centre = torch.eye(d, dtype=torch.float64, device=device) - (1.0 / d if self.residual_kind == "centered" else 0.0)

    def residual(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.params["residual"]
        if self.residual_kind == "permutation":
            return _permutation_matrix(x).to(dtype)
        c = self.centre.to(dtype)
        k = c @ (x - x.T).to(dtype) @ c  # skew, and K 1 = 0 for the centred group
        return self.init.residual.to(dtype) @ torch.linalg.matrix_exp(k)

    def head(self, name: str, dtype: torch.dtype) -> HeadTransform:
        x = self.init.heads[name]
        out = {}
        for side, rot, scale in (("qk", x.qk_rotation, x.qk_scale), ("vo", x.vo_rotation, x.vo_scale)):
            key, base_r, base_s = f"{side}/{name}", rot.to(dtype), scale.to(dtype)
            kind = self.kinds.get(key)
            p = self.params.get(key)
            if kind is None:
                r, s = base_r, base_s
            elif kind == "planes":
                group = self.attention[name]
                r, s = _project_planes(p, group.rotary_dim, group.rope_interleaved).to(dtype), base_s
            elif kind == "orthogonal":
                r, s = base_r @ torch.linalg.matrix_exp((p - p.transpose(-1, -2)).to(dtype)), base_s
            elif kind == "diagonal":
                r, s = base_r, base_s * torch.exp(p.to(dtype))
            else:  # general: A = R₀ diag(a₀) exp(X), scale folded into the matrix
                r, s = (base_r * base_s.unsqueeze(-2)) @ torch.linalg.matrix_exp(p.to(dtype)), torch.ones_like(base_s)
            out[side] = (r, s)
        return HeadTransform(x.perm, x.kv_perm, out["qk"][0], out["qk"][1], out["vo"][0], out["vo"][1], general=self.general)

    def transform(self, dtype: torch.dtype = torch.float32) -> ModelTransform:
        t = ModelTransform()
        if self.init.residual is not None:
            t.residual = self.residual(dtype)
        for name, perm in self.init.ffn.items():
            key = f"ffn/{name}"
            t.ffn[name] = _permutation_matrix(self.params[key]).detach().argmax(1) if key in self.params else perm
        for name in self.init.heads:
            t.heads[name] = self.head(name, dtype)
        return t

    def apply(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``T(model)``, differentiable in the parameters."""
        state = dict(model)
        if self.init.residual is not None:
            state = apply_residual(state, self.spec.residual, self.residual(torch.float32), dtype=torch.float32)
        view = StateView(state)
        for group in self.spec.ffn:
            key = f"ffn/{group.name}"
            if key in self.params:
                _apply_ffn_dense(view, group, _permutation_matrix(self.params[key]))
            elif group.name in self.init.ffn:
                apply_to_group(view, group, ModelTransform(ffn={group.name: self.init.ffn[group.name]}))
        for group in self.spec.attention:
            if group.name in self.init.heads:
                apply_to_group(view, group, ModelTransform(heads={group.name: self.head(group.name, torch.float32)}))
        return dict(view.state)

    @torch.no_grad()
    def condition(self) -> float:
        """The largest condition number of the learned invertible head factors ``exp(X)`` (1 when there are none):
        ``A^{-1}`` and ``A^{-T}`` of an ill-conditioned ``A`` keep the function in exact arithmetic only."""
        worst = 1.0
        for key, kind in self.kinds.items():
            x = self.params[key].double()
            if kind == "general":
                worst = max(worst, float(torch.linalg.cond(torch.linalg.matrix_exp(x)).max()))
            elif kind == "diagonal":
                worst = max(worst, float((x.max(-1).values - x.min(-1).values).exp().max()))
        return worst

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def restore(self, snap: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in snap.items():
                self.params[k].copy_(v)


def _on_path(reference: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: (1 - t) * reference[k].float() + t * v.float() if v.is_floating_point() else v for k, v in aligned.items()}


def learn_transform(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                    init: ModelTransform, loss: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor], batches: list, *,
                    symmetries: frozenset[str] = frozenset({"ffn", "qk", "vo", "scale", "heads", "residual"}),
                    steps: int = 200, seconds: float | None = None, lr: float = LEARNING_RATE, warmup: int = WARMUP_STEPS,
                    seed: int = 0, path: str = "random", learn_ffn: bool = True, eval_every: int | None = None,
                    step_positions: int | None = STEP_POSITIONS, step_loss: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor] | None = None,
                    progress: bool = False) -> tuple[ModelTransform, dict]:
    """Learn the continuous parts (and FFN permutations) of ``init``, weight matching's result (module docstring).

    ``reference`` and ``model`` must already be in a common parametrisation (both folded when ``init`` has a
    residual map); ``loss(state, batch)`` evaluates a state dict (checkpoint names) on one calibration batch: the
    objective, and the steps' loss unless ``step_loss`` is given (e.g. :func:`soft_target_loss`).
    ``step_positions``: each step's batch is a slice of a training batch scoring at least this many predictions
    (:func:`step_batches`; ``None``: whole batches); the objective always uses whole held-out batches.
    Returns the element with the lowest objective evaluated (``init`` is the first) and a record: the objective and
    midpoint loss at the start and of the element returned, the evaluations ``(step, objective, midpoint loss,
    seconds)``, the per-step batch losses, the learning-rate halvings, steps run and seconds.
    """
    if path not in PATHS:
        raise SymmergeError(f"learned matching path must be one of {', '.join(PATHS)}, got {path!r}")
    begin = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = _device_of(model)
    param = _Parametrisation(spec, init, symmetries, learn_ffn, device)
    objective_ts = (0.5,) if path == "midpoint" else (0.25, 0.5, 0.75)
    # with 4 batches or more, every 4th is held out: the objective is measured on batches no step trained on, so
    # keeping its best element is early stopping against overfitting the calibration data
    held = batches[3::4] if len(batches) >= 4 else batches
    train = [b for i, b in enumerate(batches) if i % 4 != 3] if len(batches) >= 4 else batches
    if step_positions is not None:
        train = step_batches(train, step_positions)
    eval_every = eval_every or max(1, min(25, steps // 4))

    @torch.no_grad()
    def objective() -> tuple[float, float]:
        aligned = param.apply(model)
        per_t = {t: sum(float(loss(_on_path(reference, aligned, t), b)) for b in held) / len(held) for t in objective_ts}
        return sum(per_t.values()) / len(per_t), per_t[0.5]

    def fresh_optimizer() -> torch.optim.Optimizer | None:
        return torch.optim.Adam(param.params.values(), lr=lr) if param.params else None

    first, first_mid = objective()
    best = (first, first_mid, param.snapshot(), 0)
    evaluations = [(0, first, first_mid, time.perf_counter() - begin)]
    # the seconds budget covers the whole of learning: steps stop early enough for the last objective evaluation
    # (as long as the one before; ~25 s for GPT-2 on this machine) to fit in it too
    evaluation_seconds = evaluations[0][3]
    last_evaluated = time.perf_counter()
    history: list[float] = []
    order: list[int] = []
    step, restart, shrink, halvings = 0, 0, 1.0, []
    optimizer = fresh_optimizer()
    with tqdm(total=steps, desc="learned matching", unit="step", disable=not progress, leave=False) as bar:
        while optimizer is not None and step < steps and (seconds is None or time.perf_counter() - begin + evaluation_seconds < seconds):
            if not order:
                order = rng.sample(range(len(train)), len(train))
            done = max(step / steps, (time.perf_counter() - begin) / seconds if seconds else 0.0)
            for g in optimizer.param_groups:  # after a restart, warm up again (Adam's moments start afresh)
                g["lr"] = lr * shrink * _schedule(done, step - restart, warmup if not halvings else max(warmup, WARMUP_STEPS))
            t = 0.5 if path == "midpoint" else rng.uniform(0.2, 0.8)
            value = (step_loss or loss)(_on_path(reference, param.apply(model), t), train[order.pop()])
            finite = bool(torch.isfinite(value))
            if finite:
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                history.append(value.item())
                finite = all(bool(torch.isfinite(p).all()) for p in param.params.values())
                # an element that float32 weights cannot hold exactly (far from orthogonal head maps) is out of bounds
                finite = finite and param.condition() <= MAX_CONDITION
            step += 1
            if finite and (step == steps or _evaluation_due(step, eval_every, seconds, time.perf_counter() - last_evaluated,
                                                            evaluation_seconds)):
                evaluated = time.perf_counter()
                current, mid = objective()
                last_evaluated = time.perf_counter()
                evaluation_seconds = last_evaluated - evaluated
                evaluations.append((step, current, mid, time.perf_counter() - begin))
                if current < best[0]:
                    best = (current, mid, param.snapshot(), step)
            if not finite:
                # the step overflowed or left float32's range of exact maps: the rate is too large for this pair;
                # go back to the best element, forget Adam's moments and warm up again at half the rate
                param.restore(best[2])
                optimizer, restart, shrink = fresh_optimizer(), step, shrink / 2
                halvings.append(step)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}" if history else "–", midpoint=f"{best[1]:.4f}", refresh=False)
    if evaluations[-1][0] != step and not (halvings and halvings[-1] == step):  # the budget ended between evaluations
        current, mid = objective()
        evaluations.append((step, current, mid, time.perf_counter() - begin))
        if current < best[0]:
            best = (current, mid, param.snapshot(), step)
    param.restore(best[2])
    with torch.no_grad():
        final = transform_to(param.transform(torch.float64), "cpu")
    final.ffn = {k: v.clone() for k, v in final.ffn.items()}
    record = {"steps": step, "halvings": halvings, "objective": "midpoint" if path == "midpoint" else "mean of t = 0.25, 0.5, 0.75",
              "objective_first": first, "objective_best": best[0], "midpoint_loss_first": first_mid, "midpoint_loss_best": best[1],
              "best_step": best[3], "evaluations": evaluations, "batch_losses": history, "seconds": time.perf_counter() - begin}
    return final, record


TARGET_CACHE_ELEMENTS = 1 << 26  # endpoint predictions kept (256 MB of float32); beyond, recomputed at each step


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with an earlier one (a tied LM head and the embedding) → that
    earlier name. ``functional_call`` refuses a value for both names of a tied pair."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _functional(config: Any, reference: Mapping[str, torch.Tensor], untie: bool) -> Callable:
    """``run(state, inputs)``: one frozen HF module evaluated functionally at a state dict (checkpoint names)."""
    module = build_model(untied_config(config, untie), reference).train(False)
    module.to(_device_of(reference))  # where the states are
    for p in module.parameters():
        p.requires_grad_(False)
    renames = getattr(module, "_symmerge_renames", {})
    aliases = tied_aliases(module)

    def run(state: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> Any:
        params = {renames.get(k, k): v for k, v in state.items()}
        for alias, first in aliases.items():  # a tied head (untie=False) is the embedding: give the module one of them
            if alias in params and first in params:
                del params[alias]
        return torch.func.functional_call(module, params, args=(), kwargs=dict(inputs))

    return run


def path_loss(config: Any, reference: Mapping[str, torch.Tensor], untie: bool) -> Callable:
    """``loss(state, batch)``: the loss on one batch of one HF module evaluated functionally at ``state``."""
    run = _functional(config, reference, untie)
    return lambda state, batch: run(state, batch).loss


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``−Σ q log softmax(z)`` per position, averaged over the positions ``mask`` keeps."""
    per = -(targets * logits.float().log_softmax(-1)).sum(-1)
    return (per * mask).sum() / mask.sum()


def _scored(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a model's loss scores and their labels: position i against label i + ``shift``."""
    return (logits[:, :-shift], labels[:, shift:]) if shift else (logits, labels)


def _label_shift(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> int | None:
    """How the model's own loss pairs logits with labels: position i with label i (a classifier, a masked LM: 0)
    or with label i + 1 (a causal LM shifts: 1). Found by reproducing the model's loss both ways; ``None`` when
    neither matches (not a cross-entropy over the logits' last axis)."""
    if labels.is_floating_point() or logits.shape[:-1] != labels.shape:
        return None
    for shift in (0, 1) if labels.dim() > 1 else (0,):
        z, y = _scored(logits, labels, shift)
        keep = y != -100
        if keep.any() and torch.allclose(torch.nn.functional.cross_entropy(z[keep].float(), y[keep]), loss.float(), rtol=1e-4, atol=1e-5):
            return shift
    return None


def soft_target_loss(config: Any, reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], untie: bool,
                     batches: list) -> Callable | None:
    """``loss(state, batch)``: the cross-entropy of the state's predictions to the mean of the two endpoints'
    predicted distributions ``(p_A + p_B) / 2`` on the positions the model's own loss scores (its labels choose
    them), or ``None`` where the model's loss is not a cross-entropy over its logits (a regression head).

    Why (benchmarks/results/learned_matching_sweep.md): near a good element the path loss's per-batch gradient is
    mostly noise — labels that both endpoints get wrong or are unsure of pull the path toward the labels, not toward
    the endpoints' function, which is what aligning them should reach. Fitting the endpoints' mean prediction
    raised the signal fraction of the gradient (‖μ‖² / (‖μ‖² + tr Σ), batches of 64) on ViT Fashion-MNIST from
    0.04–0.10 to 0.09–0.18 per group, and changed nothing where the endpoints are near-certain (ViT digits).
    Each batch's endpoint predictions are computed at its first use (``model`` is B before the transform: the same
    function as T(B)) and kept up to ``TARGET_CACHE_ELEMENTS`` in all; beyond that, at every use. ``batches``: the
    calibration batches (the first one tells which positions the model's loss scores).
    """
    run = _functional(config, reference, untie)
    first = batches[0]
    with torch.no_grad():
        out = run(reference, first)
    if getattr(out, "logits", None) is None or out.loss is None:
        return None
    shift = _label_shift(out.logits, first["labels"], out.loss)
    if shift is None:
        return None
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kept = 0

    def inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    @torch.no_grad()
    def targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal kept
        if id(batch) in cache:
            return cache[id(batch)]
        x = inputs(batch)
        mean = (run(reference, x).logits.float().softmax(-1) + run(model, x).logits.float().softmax(-1)) / 2
        q, labels = _scored(mean, batch["labels"], shift)
        if kept + q.numel() <= TARGET_CACHE_ELEMENTS:
            cache[id(batch)], kept = (q, (labels != -100).float()), kept + q.numel()
        return q, (labels != -100).float()

    def loss(state: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        q, mask = targets(batch)
        return _soft_cross_entropy(_scored(run(state, inputs(batch)).logits, batch["labels"], shift)[0], q, mask)

    return loss


@matcher("learned")
def match_learned(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                  symmetries: frozenset[str], *, config: Any = None, calibration: list | None = None, learn_steps: int = 200,
                  learn_seconds: float | None = None, learn_path: str = "random", learn_targets: str = "soft", progress: bool = False,
                  model_name: str = "model", device: torch.device | str | None = None, **_unused) -> Fit:
    """Weight matching, then :func:`learn_transform` on the path loss over ``calibration`` (batches with labels),
    for ``learn_steps`` steps or ``learn_seconds`` seconds, whichever ends first. ``learn_targets``: what the
    steps fit — ``"soft"`` (default: the endpoints' mean prediction, :func:`soft_target_loss`; the labels where
    the model's loss is not a cross-entropy over its logits) or ``"labels"``; the objective always uses the labels.
    ``device``: where weight matching's math, the models' forward and backward passes and the learned element live
    (the LAPs run on the CPU); the element returned is on the CPU."""
    if not calibration or not all("labels" in b for b in calibration):
        raise SymmergeError("learned matching needs calibration batches with labels (--data zoo, or an .npz with labels)")
    if learn_targets not in TARGETS:
        raise SymmergeError(f"learned matching targets must be one of {', '.join(TARGETS)}, got {learn_targets!r}")
    start = time.perf_counter()
    init = match_weights(reference, model, spec, symmetries, model_name=model_name, device=device)
    folded_reference = None if init.folded_reference is None else dict(init.folded_reference)  # the models run whole here
    if folded_reference is not None:
        reference, model = folded_reference, fold_norms(model, spec.residual)
    untie = "residual" in symmetries
    if device is not None:  # the states, the calibration batches and (in _functional) the module, on the device
        reference, model = tensors_to(reference, device), tensors_to(model, device)
        calibration = [tensors_to(b, device) for b in calibration]
    loss = path_loss(config, reference, untie)
    step_loss = soft_target_loss(config, reference, model, untie, calibration) if learn_targets == "soft" else None
    transform, record = learn_transform(reference, model, spec, init.transform, loss, calibration, symmetries=symmetries,
                                        steps=learn_steps, seconds=learn_seconds, path=learn_path, step_loss=step_loss,
                                        progress=progress)
    record["targets"] = "labels" if step_loss is None else "soft"
    details = {**init.details, "learned": {k: v for k, v in record.items() if k not in ("batch_losses", "evaluations")}}
    return Fit(transform, details, {"learned": time.perf_counter() - start},
               folded_reference=folded_reference, history=[e[1] for e in record["evaluations"]])
