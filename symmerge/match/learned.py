"""Learned matching: tune the alignment so that the *midpoint* model ``(θ_A + T(θ_B)) / 2`` has low loss on
calibration data (Git Re-Basin's straight-through estimator, extended to rotations; cf. Theus et al. 2025).

Latent matrices are projected onto their group at every step and the projection is used in the forward pass,
with the gradient passed straight through to the latent: orthogonal maps by SVD (the residual map, per-KV-head QK
and VO rotations; RoPE planes stay block rotations), FFN permutations by an exact LAP. Head permutations and
scales stay as weight matching found them. Starts from weight matching, seeded, with a step budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, apply_to_group
from symmerge.groups.heads import HeadTransform, plane_rotation_matrix
from symmerge.groups.residual import apply_residual, centered_basis, embed_centered, fold_norms
from symmerge.io.hf import build_model, untied_config
from symmerge.match.device import CPU
from symmerge.match.fit import Fit, matcher
from symmerge.match.lap import solve_lap
from symmerge.match.procrustes import procrustes
from symmerge.match.weights import match_weights
from symmerge.spec import ModelSpec, StateView
from symmerge.spec.base import FFNGroup


def _straight_through(projected: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The projection's value with the latent's gradient (∂ projected / ∂ latent taken as the identity)."""
    return projected.detach() + latent - latent.detach()


def _project_orthogonal(latent: torch.Tensor, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "centered":
            v = centered_basis(latent.shape[0]).to(device=latent.device, dtype=latent.dtype)
            q = embed_centered(procrustes(v.T @ latent @ v).cpu()).to(device=latent.device, dtype=latent.dtype)
        elif kind == "planes":  # RoPE: a rotation of each plane (i, i + d_h/2), (H, d_h, d_h) block matrices
            half = latent.shape[-1] // 2
            i = torch.arange(half)
            blocks = torch.stack([torch.stack([latent[:, i, i], latent[:, i, i + half]], -1),
                                  torch.stack([latent[:, i + half, i], latent[:, i + half, i + half]], -1)], -2)
            r = procrustes(blocks.double(), proper=True)
            q = plane_rotation_matrix(r[..., 0, 0], r[..., 1, 0]).to(latent.dtype)
        else:
            q = procrustes(latent.double()).to(latent.dtype)
    return _straight_through(q, latent)


def _permutation_matrix(latent: torch.Tensor) -> torch.Tensor:
    """Straight-through dense permutation ``P`` (``P[j, perm[j]] = 1``) from an exact LAP on the latent scores."""
    perm = torch.from_numpy(solve_lap(latent.detach().cpu()))
    p = torch.zeros_like(latent)
    p[torch.arange(len(perm)), perm] = 1.0
    return _straight_through(p, latent)


def _apply_ffn_dense(view: StateView, group: FFNGroup, p: torch.Tensor) -> None:
    """``W_in → P W_in``, ``b_in → P b_in``, ``W_out → W_out Pᵀ`` (the index form ``w[perm]`` as a product)."""
    for slot in group.inputs + group.input_biases:
        view.set(slot, p @ view.get(slot))
    for slot in group.outputs:
        view.set(slot, view.get(slot) @ p.T)


def learn_transform(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                    init: ModelTransform, loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], *, steps: int = 200,
                    lr: float = 1e-2, seed: int = 0, progress: bool = False, device: torch.device | None = None) -> tuple[ModelTransform, list[float]]:
    """Learn the residual map, per-head rotations and FFN permutations of ``init`` (weight matching's result).

    ``reference`` and ``model`` must already be in a common parametrisation (both folded when ``init`` has a
    residual map); ``loss(state)`` evaluates a state dict (checkpoint names) on calibration data. Returns the
    transform with the lowest midpoint loss seen (never worse than ``init``, the first step) and the loss per step.
    ``device``: where the states, latents and projections live (``loss`` must evaluate there: :func:`midpoint_loss`
    with the same device); the LAPs run on the CPU and the transform is returned on the CPU.
    """
    torch.manual_seed(seed)
    device = torch.device("cpu") if device is None else torch.device(device)
    reference = {k: v.to(device) for k, v in reference.items()}
    model = {k: v.to(device) for k, v in model.items()}
    latents: dict[str, torch.Tensor] = {}
    if init.residual is not None:
        latents["residual"] = init.residual.float().to(device).clone().requires_grad_(True)
    for name, perm in init.ffn.items():
        scores = torch.zeros(len(perm), len(perm), device=device)
        scores[torch.arange(len(perm)), perm] = 1.0
        latents[f"ffn/{name}"] = scores.requires_grad_(True)
    qk_fixed = {g.name for g in spec.attention if g.qk_fixed}  # no QK rotation is a symmetry there: keep init's (identity)
    for name, x in init.heads.items():
        if name not in qk_fixed:
            latents[f"qk/{name}"] = x.qk_rotation.float().to(device).clone().requires_grad_(True)
        latents[f"vo/{name}"] = x.vo_rotation.float().to(device).clone().requires_grad_(True)
    optimizer = torch.optim.Adam(latents.values(), lr=lr)
    rope = {g.name: g.rope for g in spec.attention}
    history: list[float] = []

    def current(project: Callable) -> tuple[dict, ModelTransform]:
        transform = ModelTransform()
        state = dict(model)
        if "residual" in latents:
            kind = spec.residual.kind  # post-LN / sandwich norms: only permutations are symmetries, not rotations
            transform.residual = _permutation_matrix(latents["residual"]) if kind == "permutation" else project("residual", kind)
            state = apply_residual(state, spec.residual, transform.residual)
        view = StateView(state)
        for group in spec.ffn:
            if f"ffn/{group.name}" in latents:
                p = _permutation_matrix(latents[f"ffn/{group.name}"])
                transform.ffn[group.name] = p.detach().argmax(1)
                _apply_ffn_dense(view, group, p)
        for group in spec.attention:
            if group.name in init.heads:
                x = init.heads[group.name]
                qk = x.qk_rotation.float() if group.name in qk_fixed else project(f"qk/{group.name}", "planes" if rope[group.name] else "orthogonal")
                x = HeadTransform(x.perm, x.kv_perm, qk, x.qk_scale.float(),
                                  project(f"vo/{group.name}", "orthogonal"), x.vo_scale.float())
                transform.heads[group.name] = x
                apply_to_group(view, group, ModelTransform(heads={group.name: x}))
        return dict(view.state), transform

    def project(key: str, kind: str) -> torch.Tensor:
        return _project_orthogonal(latents[key], kind)

    best_value, transform = float("inf"), None
    for _ in tqdm(range(steps), desc="learned matching", unit="step", disable=not progress, leave=False):
        aligned, candidate = current(project)
        midpoint = {k: (reference[k].float() + v.float()) / 2 if v.is_floating_point() else v for k, v in aligned.items()}
        value = loss(midpoint)
        history.append(value.item())
        if history[-1] < best_value:  # projections jump: keep the best element seen (step 0 is weight matching's)
            best_value, transform = history[-1], candidate
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    final = ModelTransform(ffn={k: v.cpu().clone() for k, v in transform.ffn.items()},
                           heads={k: HeadTransform(x.perm, x.kv_perm, x.qk_rotation.detach(), x.qk_scale.detach(),
                                                   x.vo_rotation.detach(), x.vo_scale.detach()).to(torch.float64, CPU)
                                  for k, x in transform.heads.items()},
                           residual=None if transform.residual is None else transform.residual.detach().double().cpu())
    return final, history


def midpoint_loss(config: Any, reference: Mapping[str, torch.Tensor], batches: list, untie: bool,
                  device: torch.device | None = None) -> Callable:
    """``loss(state)``: the mean loss over ``batches`` of one HF module evaluated functionally at ``state`` (module
    and batches on ``device``, default the CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    module = build_model(untied_config(config, untie), reference).train(False).to(device)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    for p in module.parameters():
        p.requires_grad_(False)
    renames = getattr(module, "_symmerge_renames", {})

    def loss(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        params = {renames.get(k, k): v for k, v in state.items()}
        return sum(torch.func.functional_call(module, params, args=(), kwargs=b).loss for b in batches) / len(batches)

    return loss


@matcher("learned")
def match_learned(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                  symmetries: frozenset[str], *, config: Any = None, calibration: list | None = None, learn_steps: int = 200,
                  progress: bool = False, model_name: str = "model", max_seconds: float | None = None,
                  device: torch.device | None = None, executor: Any = None, **_unused) -> Fit:
    """Weight matching (its residual descent within ``max_seconds``), then :func:`learn_transform` on the midpoint loss over ``calibration`` (batches with labels)."""
    if not calibration or not all("labels" in b for b in calibration):
        raise SymmergeError("learned matching needs calibration batches with labels (--data zoo, or an .npz with labels)")
    start = time.perf_counter()
    init = match_weights(reference, model, spec, symmetries, model_name=model_name, max_seconds=max_seconds, device=device,
                         executor=executor)
    if init.folded_reference is not None:
        reference, model = init.folded_reference, fold_norms(model, spec.residual)
    loss = midpoint_loss(config, reference, calibration, "residual" in symmetries, device)
    transform, history = learn_transform(reference, model, spec, init.transform, loss, steps=learn_steps, progress=progress, device=device)
    details = {**init.details, "learned": {"steps": learn_steps, "midpoint_loss_first": history[0],
                                           "midpoint_loss_best": min(history), "midpoint_loss_last": history[-1]}}
    return Fit(transform, details, {"learned": time.perf_counter() - start}, folded_reference=init.folded_reference, history=history)
