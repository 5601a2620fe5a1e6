"""Activation matching: the closed forms of weight matching, fed with cross-correlations of activations.

Both models run on the same calibration inputs; hooks record, per layer, the FFN hidden activations (the input of
``W_out``), the per-head queries, keys and values (before RoPE: the outputs of the Q/K/V projections) and the
residual stream (every layer's hidden states). Then, with activations as the rows of the blocks:

- FFN: ``S = H_ref^T H_model`` (d_ff×d_ff) → exact LAP;
- attention: per KV head ``M_X = Σ q_1 q_2^T`` (the group's queries), ``M_Y = Σ k_1 k_2^T`` → Procrustes / RoPE planes,
  quartic rescaling, head assignment, exactly as :func:`symmerge.match.attention.match_heads`; VO from the values;
- residual: ``M = Σ_layers H_model^T H_ref`` (d×d) → Procrustes in the residual group, the *start* of weight
  matching's coordinate descent (:func:`refine_residual`), which then returns ``Q`` and every per-layer element.

Per-layer activations are unchanged by the residual map (it is a symmetry), so without the residual class each
per-layer group is solved once, no alternation. Why the residual class hands over to the weights: docs/DESIGN.md
(activation matching) and :func:`refine_residual`.

Memory does not grow with the calibration set: the models run batch by batch and only sums over positions are kept
(:func:`accumulate_statistics`); head matching runs on rows rebuilt from Gram matrices (:func:`_equivalent_rows`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from symmerge.errors import SymmergeError
from symmerge.groups import ModelTransform, require_residual
from symmerge.groups.heads import HeadTensors, read_heads
from symmerge.groups.residual import fold_norms
from symmerge.io.hf import build_model, untied_config
from symmerge.match.attention import match_heads
from symmerge.match.fit import Fit, matcher
from symmerge.match.lap import solve_lap
from symmerge.match.residual import residual_descent, solve_residual
from symmerge.spec import ModelSpec, Slot, StateView, spec_for


def _module(model: torch.nn.Module, weight_key: str) -> torch.nn.Module:
    return model.get_submodule(weight_key.removesuffix(".weight"))


class _StreamRead(Exception):
    """Raised before the last block runs when only the residual stream is wanted: nothing after its input is read."""


@torch.no_grad()
def record_activations(model: torch.nn.Module, spec: ModelSpec, batch: Mapping[str, torch.Tensor], residual: bool,
                       per_layer: bool = True, stream: str = "hidden_states") -> dict:
    """One batch's activations, per group of ``spec`` (the live module's): with ``per_layer``, FFN hidden (N, d_ff),
    q (N, H·d_h), k, v (N, H_kv·d_h); with ``residual``, every layer's residual-stream hidden states as a list of
    (N, d): the model's ``hidden_states`` but the last (in decoders it is taken after the final norm). N counts every
    position of the batch (padding included for fixed windows).

    ``stream``: where ``residual`` is read — ``"hidden_states"`` (the model's output), ``"blocks"`` (the input of
    each of ``spec.blocks``, the forward stopped before the last block runs: the last block, final norm and head
    are never computed), or ``"both"`` (the first, plus the second under ``"block_inputs"``, to check they agree)."""
    store: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []

    def keep(name: str, slot: Slot | None = None, use_input: bool = False):
        def hook(module, inputs, output):  # a module may run more than once (DeBERTa projects relative positions too)
            t = (inputs[0] if use_input else output).detach().float()
            t = t.reshape(-1, t.shape[-1])
            store[name].append(slot.select(t, dim=1) if slot else t)  # a fused projection's block (GPT-NeoX: per head)
        return hook

    def block_input(module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if isinstance(h, torch.Tensor):
            store["block_inputs"].append(h.detach().float().reshape(-1, h.shape[-1]))

    def stop(module, args, kwargs):
        raise _StreamRead

    for g in spec.ffn if per_layer else ():
        hooks.append(_module(model, g.outputs[0].key).register_forward_hook(keep(g.name + "/hidden", use_input=True)))
    for g in spec.attention if per_layer else ():
        for part, slot in (("q", g.q), ("k", g.k), ("v", g.v)):
            hooks.append(_module(model, slot.key).register_forward_hook(keep(f"{g.name}/{part}", slot)))
    if residual and stream != "hidden_states":
        for block in spec.blocks:
            hooks.append(model.get_submodule(block).register_forward_pre_hook(block_input, with_kwargs=True))
        if stream == "blocks":  # registered after the last block's block_input: its input is kept, then the run stops
            hooks.append(model.get_submodule(spec.blocks[-1]).register_forward_pre_hook(stop, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        # activations need no loss: labels stay out of the forward pass
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        try:
            out = model(**inputs, output_hidden_states=residual and stream != "blocks")
        except _StreamRead:
            out = None
        if residual:  # the last entry is taken after the final norm in decoders: not the residual stream
            store["residual"] = store.pop("block_inputs") if out is None else [
                h.detach().float().reshape(-1, h.shape[-1]) for h in out.hidden_states[:-1]]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # a module that ran once is its one tensor (torch.cat would copy it)
    return {k: v if k in ("residual", "block_inputs") else v[0] if len(v) == 1 else torch.cat(v) for k, v in store.items()}


def _blocks_carry_the_stream(acts: dict) -> bool:
    """Whether the blocks' inputs are exactly the ``hidden_states`` the stream is read from (a ``"both"`` record):
    true of every family in the tests, checked per run on its first batch before the cheaper ``"blocks"`` is used."""
    blocks, hidden = acts.get("block_inputs", []), acts["residual"]
    return len(blocks) == len(hidden) and all(b.shape == h.shape and torch.equal(b, h) for b, h in zip(blocks, hidden))


HEAD_PARTS = ("q", "k", "v")


@torch.no_grad()
def accumulate_statistics(reference: torch.nn.Module, model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                          residual: bool, per_layer: bool = True) -> tuple[dict, ModelSpec]:
    """The sums over every calibration position that activation matching needs, accumulated batch by batch so memory
    does not grow with the calibration set (a whole set of GPT-2-w256 activations is ~22 GB per model). Each batch's
    products are float32 GEMMs (float64 ones cost ~3.7x as much with the float64 copy of every activation), summed
    over batches in float64: the rounding is that of one batch's sum, ~1e-6 relative.

    With ``per_layer`` (the per-layer groups' statistics; with the residual class alone only ``residual`` is read,
    so :func:`fit_from_activations` skips them — they were most of its time):

    - ``name/ffn``: ``H_ref^T H_model`` (d_ff × d_ff), the FFN similarity itself;
    - ``name/q`` (``k``, ``v``): the Gram matrix ``Z^T Z`` of ``Z = [q of the reference | q of the model]`` (positions as
      rows), from which :func:`_equivalent_rows` rebuilds activations with the same inner products (one per part: q,
      k and v are never contracted with each other, and may count different positions);
    - ``residual``: ``Σ_layers H_model^T H_ref`` (d × d)."""
    live = spec_for(reference.config, reference.state_dict().keys())  # both modules are built from one config
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:  # one batch's float32 product into the float64 sum
        sums[key] = value.double() if key not in sums else sums[key].add_(value)

    # the stream alone: after a first batch shows the blocks' inputs are the hidden states, the forward stops there
    stream = "both" if residual and not per_layer and live.blocks else "hidden_states"
    for batch in batches:
        ref_acts = record_activations(reference, live, batch, residual, per_layer, stream)
        model_acts = record_activations(model, live, batch, residual, per_layer, stream)
        if stream == "both":
            stream = "blocks" if _blocks_carry_the_stream(ref_acts) and _blocks_carry_the_stream(model_acts) else "hidden_states"
        for g in live.ffn if per_layer else ():
            add(g.name + "/ffn", ref_acts[g.name + "/hidden"].T @ model_acts[g.name + "/hidden"])
        for g in live.attention if per_layer else ():
            for part in HEAD_PARTS:
                z = torch.cat([ref_acts[f"{g.name}/{part}"], model_acts[f"{g.name}/{part}"]], dim=1)
                add(f"{g.name}/{part}", z.T @ z)
        if residual:  # Σ_layers H_model^T H_ref as one GEMM over the layers' positions stacked
            add("residual", torch.cat(model_acts["residual"]).T @ torch.cat(ref_acts["residual"]))
        del ref_acts, model_acts
    if not sums:
        raise SymmergeError("activation matching needs calibration data: the calibration set is empty")
    return sums, live


def _equivalent_rows(gram: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Activations with the inner products of the recorded ones: ``Z' = Λ^{1/2} U^T`` for ``Z^T Z = U Λ U^T``
    (eigendecomposition), so ``Z'^T Z' = Z^T Z`` with as many rows as ``Z`` has columns instead of one per position;
    split by column into the blocks of ``widths``. Every quantity head matching computes from activations — the
    cross-correlations ``Σ q_ref q_model^T``, norms, the quartic's sums — contracts over positions, so it is the same
    on ``Z'`` (up to float rounding): the element is that of the full activations."""
    values, vectors = torch.linalg.eigh(gram)
    rows = (values.clamp_min(0).sqrt()[:, None] * vectors.T).float()
    return list(torch.split(rows, widths, dim=1))


def _head_activations(acts: dict, name: str, h: int, kv: int, dh: int, o: torch.Tensor, o_scale: float) -> HeadTensors:
    """Activations as head blocks (rows = head dimensions, columns = positions). Values alone cannot fix the VO
    scale (V·c with W_O/c leaves v's direction unchanged), so the O side carries the head's ``W_O`` columns,
    scaled by ``o_scale`` (one constant per layer for both models, which keeps exact recovery exact)."""
    def split(t: torch.Tensor, heads: int) -> torch.Tensor:  # (N, heads·d_h) → (heads, d_h, N)
        return t.reshape(t.shape[0], heads, dh).permute(1, 2, 0)

    q, k, v = split(acts[f"{name}/q"], h), split(acts[f"{name}/k"], kv), split(acts[f"{name}/v"], kv)
    zeros = lambda n: torch.zeros(n, dh)  # noqa: E731  (biases are inside the activations)
    return HeadTensors(q, zeros(h), k, zeros(kv), v, zeros(kv), o * o_scale)


def refine_residual(reference_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], spec: ModelSpec,
                    symmetries: frozenset[str], start: torch.Tensor, *, deadline: float | None = None,
                    device: torch.device | None = None, progress: bool = False, model_name: str = "model") -> Fit:
    """Weight matching's coordinate descent (:func:`~symmerge.match.residual.residual_descent`) started from the
    residual map the activations give: the activations choose the basin, the weights settle ``Q`` and the per-layer
    elements in it.

    Why (measured on the five zoo pairs, midpoint barrier, docs/DESIGN.md): the one-shot activation element was
    worse than weight matching on four pairs, and its residual map was the cause — swapping weight matching's ``Q``
    in, per-layer elements still from activations, cut the wide ViT's barrier from 0.92 to 0.66 and GPT-2's from
    0.43 to 0.29. Normalising the stream statistic (per position as the norm reads it, per layer, centred, whitened
    as in CCA) improved that ``Q`` but closed only about half the gap to weight matching. Per-layer elements from activations, given one
    ``Q``, beat the weights' on the two small ViTs but lost on GPT-2 and the wide ViT (0.66 vs 0.41), so they come
    from the descent. Weight matching's own starts (identity, anchored slots) are not used: its objective is flat
    across basins (final distances within 0.2 %, barriers up to 1.7× apart), so the start decides; the data's
    start ended at a lower barrier than weight matching on all five pairs (the wide GPT-2 within 2 %)."""
    return residual_descent(reference_state, model_state, spec, symmetries - {"residual"}, start=start, folded=False,
                            deadline=deadline, device=device, progress=progress, model_name=model_name,
                            label="residual descent, activation start")


def per_layer_from_activations(sums: dict, live: ModelSpec, spec: ModelSpec, symmetries: frozenset[str],
                               reference_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                               device: torch.device | None = None) -> tuple[ModelTransform, dict]:
    """Every chosen per-layer element from the statistics of :func:`accumulate_statistics`: FFN permutations by LAP on
    ``H_ref^T H_model``, heads by :func:`~symmerge.match.attention.match_heads` on rows rebuilt from the Gram
    matrices, their O side from the states' ``W_O`` columns (both states in one residual basis)."""
    transform, details = ModelTransform(), {}
    if "ffn" in symmetries:
        for g_live, g in zip(live.ffn, spec.ffn):
            transform.ffn[g.name] = torch.from_numpy(solve_lap(sums[g_live.name + "/ffn"].float().cpu()))
    if symmetries & {"qk", "vo", "scale", "heads"}:
        ref_view, model_view = StateView(reference_state), StateView(model_state)
        for g_live, g in zip(live.attention, spec.attention):
            h, kv, dh = g.num_heads, g.kv_heads, g.head_dim
            ref_acts, model_acts = {}, {}
            for part, width in zip(HEAD_PARTS, (h * dh, kv * dh, kv * dh)):
                key = f"{g_live.name}/{part}"
                ref_acts[key], model_acts[key] = _equivalent_rows(sums[key], [width, width])
            o_ref, o_model = read_heads(ref_view, g).o, read_heads(model_view, g).o
            # weigh the O side like the V side: ‖v_ref‖ / ‖W_O,ref‖
            o_scale = float(ref_acts[f"{g_live.name}/v"].norm().cpu() / o_ref.norm().clamp_min(1e-30))
            transform.heads[g.name], details[g.name] = match_heads(
                _head_activations(ref_acts, g_live.name, h, kv, dh, o_ref, o_scale),
                _head_activations(model_acts, g_live.name, h, kv, dh, o_model, o_scale),
                qk="qk" in symmetries, vo="vo" in symmetries, scale="scale" in symmetries, heads="heads" in symmetries, rope=g.rope,
                qk_fixed=g.qk_fixed, device=device, rotary_dim=g.rotary_dim, rope_interleaved=g.rope_interleaved)
    return transform, details


def fit_from_activations(reference: torch.nn.Module, model: torch.nn.Module, spec: ModelSpec, symmetries: frozenset[str],
                         batches: list[Mapping[str, torch.Tensor]], reference_state: Mapping[str, torch.Tensor],
                         model_state: Mapping[str, torch.Tensor], device: torch.device | None = None, *,
                         max_seconds: float | None = None, progress: bool = False, model_name: str = "model") -> Fit:
    """The transform bringing ``model`` onto ``reference``, from activations on ``batches``; group names follow
    ``spec`` (the checkpoint's spec: the live modules' names may differ, the groups' order does not). ``device``:
    where the models run and the correlations are taken (the modules are moved there); LAPs on the CPU.

    Per-layer classes alone: each group matched on its activations (:func:`per_layer_from_activations`). With the
    residual class: the residual map solved from the stream's cross-products starts weight matching's descent
    (:func:`refine_residual`, ``max_seconds`` its budget), which returns ``Q`` and the per-layer elements."""
    begin = time.perf_counter()
    if device is not None:
        reference, model = reference.to(device), model.to(device)
    sums, live = accumulate_statistics(reference, model, batches, "residual" in symmetries, per_layer="residual" not in symmetries)
    seconds = {"activations": time.perf_counter() - begin}
    if "residual" in symmetries:
        start = solve_residual(sums["residual"], require_residual(spec).kind)
        fit = refine_residual(reference_state, model_state, spec, symmetries, start, device=device, progress=progress, model_name=model_name,
                              deadline=None if max_seconds is None else begin + max_seconds)
        if fit.transform.residual is None:  # no step of the descent got closer than the models as given: keep the start
            fit.transform.residual = start
        fit.details["residual"] = {**fit.details["residual"], "start": "activations", "iterations": len(fit.history) - 1,
                                   "distance_history": [round(h, 6) for h in fit.history]}
        fit.seconds = {**seconds, **fit.seconds}
        return fit
    transform, details = per_layer_from_activations(sums, live, spec, symmetries, reference_state, model_state, device)
    return Fit(transform, details, {**seconds, "per_layer": time.perf_counter() - begin - seconds["activations"]})


@matcher("activations")
def match_activations(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                      symmetries: frozenset[str], *, config: Any = None, calibration: list | None = None,
                      device: torch.device | None = None, max_seconds: float | None = None, progress: bool = False,
                      model_name: str = "model", **_unused) -> Fit:
    """Activation matching on HF modules rebuilt from the two state dicts (untied when the residual class folds a
    tied head), fed with ``calibration`` (a list of model-input batches). ``max_seconds``: the budget of the
    residual descent it starts (:func:`fit_from_activations`)."""
    if not calibration:
        raise SymmergeError("activation matching needs calibration data (--data: zoo, a text file or an .npz)")
    if config is None:
        raise SymmergeError("activation matching needs the model's config to rebuild the models")
    config = untied_config(config, untie="residual" in symmetries)
    fit = fit_from_activations(build_model(config, reference), build_model(config, model), spec, symmetries, calibration,
                               reference, model, device, max_seconds=max_seconds, progress=progress, model_name=model_name)
    if fit.transform.residual is not None:  # the descent's lazily folded reference, materialised once
        fit.folded_reference = fold_norms(reference, require_residual(spec))
    return fit
