"""Per-layer weight matching: one exact element per FFN and attention group (docs/DESIGN.md §2).

Stages (each timed): FFN matching (similarity GEMM + exact LAP per layer; the LAPs of different layers run in a
2-thread pool while the next layer's similarity is built), attention matching (head assignment, Procrustes and
quartic for all heads of a layer at once). With both, the attention groups are fitted on the main thread while the
FFN solvers run (each fit is independent of every other, so the element is the same): their mostly
single-threaded linear algebra then shares the cores with the LAPs instead of running after them, one core idle.
Fine-tunes of one base solve no LAP (their FFN identities are certified): there the next FFN's certificate runs
beside each attention fit instead, on a thread of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.groups import HeadTransform, ModelTransform, read_ffn, read_heads
from symmerge.groups.ffn import embedding
from symmerge.match.attention import match_heads
from symmerge.match.ffn import ffn_similarity, ffn_similarity_or_identity, identity_certified
from symmerge.match.fit import Fit
from symmerge.match.lap import solve_lap
from symmerge.match.objective import distance_and_norm, squared_distance
from symmerge.match.procrustes import torch_threads
from symmerge.spec import AttentionGroup, FFNGroup, ModelSpec, StateView, widths_differ

ATTENTION_CLASSES = frozenset({"qk", "vo", "scale", "heads"})
MIN_GAIN = 0.05
"""A merge aligns only if some model's alignment lowers its distance to the reference by more than this fraction
(docs/DESIGN.md §3, "identity for fine-tunes"): fine-tunes of one base already share its basis, and the
Procrustes / rescaling optimum of two nearly equal weight sets is a near-identity that only fits their noise."""


def ffn_group_similarity(ref: StateView, model: StateView, group: FFNGroup, device: torch.device | None = None,
                         model_group: FFNGroup | None = None) -> torch.Tensor | None:
    """One FFN's similarity matrix, built on ``device`` and returned on the CPU (where the LAP runs); ``None`` when
    the identity is certified optimal from part of it (:func:`~symmerge.match.ffn.ffn_similarity_or_identity`:
    fine-tunes of one base skip most of the GEMM and the LAP). ``model_group``: the model's own group when it is
    narrower than the reference's (a rectangular matrix, never certified: the identity is not a semi-permutation)."""
    if model_group is not None and model_group.width != group.width:
        return ffn_similarity(read_ffn(ref, group), read_ffn(model, model_group), device=device).cpu()
    # the stored tensors (bf16 at 7B): the certificate converts them to float32 a chunk at a time, and only
    # ffn_similarity, when the identity is not certified, converts whole matrices
    s = ffn_similarity_or_identity(read_ffn(ref, group, stored=True), read_ffn(model, group, stored=True), device=device)
    return None if s is None else s.cpu()


def ffn_group_certified(ref: StateView, model: StateView, group: FFNGroup, device: torch.device | None = None) -> bool:
    """Whether the identity is certified optimal for one FFN of two same-width models
    (:func:`~symmerge.match.ffn.identity_certified`), without building the similarity when it is not."""
    return identity_certified(read_ffn(ref, group, stored=True), read_ffn(model, group, stored=True), device=device)


def ffn_group_full_similarity(ref: StateView, model: StateView, group: FFNGroup, device: torch.device | None = None) -> torch.Tensor:
    """:func:`ffn_group_similarity`'s matrix where the certificate was already tried and failed: the same bits."""
    return ffn_similarity(read_ffn(ref, group, stored=True), read_ffn(model, group, stored=True), device=device).cpu()


def solve_ffn(similarity: torch.Tensor | None, width: int) -> tuple[torch.Tensor, float]:
    """The FFN's permutation — the identity where it was certified (``similarity`` ``None``), else the exact
    (possibly rectangular) LAP — and by how much it lowers the FFN's squared distance to the reference:
    ``‖P·W_model − W_ref‖² = ‖W_model‖² + ‖W_ref‖² − 2⟨S, P⟩`` over the tensors ``S`` sums (Zhang et al. 2025,
    eq. 6), so the decrease is ``2(Σ_i S[i, P(i)] − Σ_i S[i, i])``, read off ``S`` (in the precision it was built in)
    around the solve. A narrower model's rectangular assignment has no identity to compare with: 0."""
    if similarity is None:
        return torch.arange(width), 0.0
    square = similarity.shape[0] == similarity.shape[1]
    trace = float(similarity.diagonal().sum(dtype=torch.float64)) if square else 0.0
    perm, total = solve_lap(similarity, overwrite=True, with_total=True)
    return torch.from_numpy(perm), (2.0 * (total - trace) if square else 0.0)


def fit_attention_group(ref: StateView, model: StateView, group: AttentionGroup, symmetries: frozenset[str],
                        device: torch.device | None = None, model_group: AttentionGroup | None = None) -> tuple[HeadTransform, dict]:
    """One attention layer's element (head assignment, rotations, scales) and its report details. ``model_group``:
    the model's own group when it has fewer heads (the element is then a semi-permutation)."""
    return match_heads(read_heads(ref, group), read_heads(model, model_group or group), qk="qk" in symmetries, vo="vo" in symmetries,
                       scale="scale" in symmetries, heads="heads" in symmetries, rope=group.rope, qk_fixed=group.qk_fixed,
                       device=device, rotary_dim=group.rotary_dim, rope_interleaved=group.rope_interleaved)


def ffn_details(perm: torch.Tensor, decrease: float) -> dict:
    return {"neurons_moved": int((perm != torch.arange(len(perm))).sum()), "objective_decrease": decrease}


def record_distances(ref: StateView, model: StateView, group: FFNGroup | AttentionGroup, out: dict[str, tuple[float, float]]) -> None:
    """``out[key] = (‖θ_model − θ_ref‖², ‖θ_ref‖²)`` for the group's tensors, taken while the fit has just read them
    (still in the page cache): the alignment report then need not read them again
    (:func:`~symmerge.match.objective.report_distances`), a whole pass over both models at 7B, where the two
    checkpoints do not fit in memory together. The same function as the report's (:func:`~symmerge.match.objective.distance_and_norm`)."""
    for key in sorted({s.key for s in group.slots()} - out.keys()):
        if key in ref.state and key in model.state and model.state[key].is_floating_point():
            out[key] = distance_and_norm(model.state[key], ref.state[key])


LAP_WORKERS = 2
"""Threads solving FFN LAPs at once (they release the GIL)."""


def fit_ffn(ref: StateView, model: StateView, spec: ModelSpec, bar: tqdm, max_pending: int = 2,
            device: torch.device | None = None, model_spec: ModelSpec | None = None,
            distances: dict[str, tuple[float, float]] | None = None,
            interleave: Sequence[Callable[[], None]] = ()) -> dict[str, tuple[torch.Tensor, float]]:
    """Per FFN, its permutation and the decrease of its squared distance (:func:`solve_ffn`): one exact LAP per FFN,
    ``P = argmax ⟨P, S⟩`` with ``S`` from :func:`ffn_similarity` (built on ``device``, moved to the CPU for the solver);
    at most ``max_pending`` similarity matrices wait for a solver at a time (memory stays at a few d_ff×d_ff).
    ``model_spec``: a narrower model's own spec (rectangular LAPs). ``distances``: filled by :func:`record_distances`
    group by group (``None``: not recorded).

    ``interleave``: other work for this thread while the solvers run (the attention fits), one item after each FFN's
    matrix is handed to its solver, the rest before waiting for the last solvers; each item runs exactly once, in
    order, whatever the FFN count, with torch's threads less those of the pending solvers that solve a LAP (at
    least one): a thread team of small ops that must wait for cores the solvers hold collapses (batched 64×64 SVDs
    ran >100× slower at 2 threads on a saturated 2-core machine, :func:`~symmerge.match.procrustes.single_threaded`).
    Where an FFN's identity was certified (fine-tunes of one base: no LAP to share the cores with), the next FFN's
    certificate is tried on a thread of its own while that item runs (one torch thread each; the item gets the rest);
    where it fails, the similarity is built here, as without it."""
    model_groups = {g.name: g for g in (model_spec or spec).ffn}
    perms: dict[str, tuple[torch.Tensor, float]] = {}
    pending: deque[tuple[str, Future, bool]] = deque()  # (group, solver, whether it solves a LAP)
    side_work = deque(interleave)

    def collect() -> None:
        name, fut, _ = pending.popleft()
        perms[name] = fut.result()
        bar.update(1)

    def side(certifying: bool) -> None:
        # the threads the pending LAPs and a certificate tried ahead leave (certified identities solve nothing):
        # fine-tunes of one base, whose FFNs are all certified, fit their attention on the thread the certificate
        # leaves, instead of one thread beside idle solvers. Counted from what was submitted, not from which
        # solvers have finished, so the count (and with it any thread-dependent rounding) is the same on every run
        solving = min(sum(lap for _, _, lap in pending), LAP_WORKERS) + certifying
        with torch_threads(torch.get_num_threads() - solving):
            side_work.popleft()()

    def certify(group: FFNGroup) -> bool:
        # on its own thread, one torch thread: most of the certificate's passes are memory-bound and its first
        # rung is a small GEMM, so beside an attention fit it costs the attention fit little
        with torch_threads(1):
            certified = ffn_group_certified(ref, model, group, device)
            if certified and distances is not None:
                record_distances(ref, model, group, distances)
            return certified

    groups = list(spec.ffn)
    ahead: Future | None = None  # the certificate of the FFN about to be fitted, tried beside the previous attention fit
    with ThreadPoolExecutor(LAP_WORKERS) as pool, ThreadPoolExecutor(1) as certifier:  # both release the GIL
        for i, group in enumerate(groups):
            if ahead is not None:  # the certificate was tried: no second attempt where it failed
                similarity = None if ahead.result() else ffn_group_full_similarity(ref, model, group, device)
            else:
                similarity = ffn_group_similarity(ref, model, group, device, model_groups[group.name])
            if distances is not None:
                record_distances(ref, model, group, distances)
            certified = similarity is None
            pending.append((group.name, pool.submit(solve_ffn, similarity, group.width), not certified))
            del similarity  # the solver holds it now; freed as soon as it is solved
            # fine-tunes of one base (this FFN certified): try the next FFN's certificate beside this layer's
            # attention fit, a thread each; their passes are mostly single-threaded, so on two cores the layer takes
            # about the longer of the two instead of their sum (a 7B-width layer: 3.4 → 2.6 s on 2 cores)
            following = groups[i + 1] if i + 1 < len(groups) else None
            ahead = None
            if certified and side_work and following is not None and model_groups[following.name].width == following.width:
                ahead = certifier.submit(certify, following)
            if side_work:
                side(ahead is not None)
            while len(pending) > max_pending:
                collect()
        while side_work:
            side(False)
        while pending:
            collect()
    return perms


def fit_per_layer(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec,
                  symmetries: frozenset[str], *, progress: bool = False, model_name: str = "model",
                  device: torch.device | None = None, executor: Any = None, model_spec: ModelSpec | None = None,
                  bar: tqdm | None = None, distances: bool = False) -> Fit:
    """The per-layer element (every class but ``residual``) bringing ``model`` closest to ``reference`` (state dicts
    of one ``spec``). Reads only the tensors the groups touch, one group at a time; applies nothing. ``device``:
    where the GEMMs, SVDs and quartics run (:mod:`symmerge.match.device`); the element is on the CPU.
    ``executor``: fit the groups elsewhere (:class:`symmerge.match.distributed.RayExecutor`: one Ray task per
    group), with the same result.

    ``model_spec``: the model's own spec when it is narrower than ``spec`` (fewer FFN neurons or heads, checked by
    :func:`symmerge.spec.check_embeddable`): the element is then a semi-permutation into ``spec``'s widths (rectangular
    assignments; the identity embedding for a class that is off) and names ``model_spec`` as its ``source``.

    ``bar``: a progress bar to advance instead of a bar of its own; its total grows by this fit's groups (the
    residual descent fits once per round and shows one bar for all its rounds).

    ``distances``: record each group's distances before alignment while its tensors are in memory
    (``Fit.distances``, :func:`record_distances`); for fits of the models as they are, not of transformed views."""
    if model_spec is not None and not widths_differ(spec, model_spec):
        model_spec = None
    if executor is not None:
        if model_spec is not None:
            raise SymmergeError("models of different widths are aligned in this process: drop --ray")
        return executor.fit_many([(reference, model)], spec, symmetries, device=device, progress=progress, names=[model_name])[0]
    seconds: dict[str, float] = {}
    ref_view, model_view = StateView(reference), StateView(model)
    transform = ModelTransform(source=model_spec)
    model_groups = {g.name: g for g in (model_spec or spec).groups()}
    attention_on = bool(symmetries & ATTENTION_CLASSES)
    total = len(spec.ffn) * ("ffn" in symmetries) + len(spec.attention) * attention_on
    details: dict[str, dict] = {}
    recorded: dict[str, tuple[float, float]] | None = {} if distances and model_spec is None else None  # same shapes only
    if bar is not None:
        bar.total = (bar.total or 0) + total
        bar.refresh()
    with (tqdm(total=total, desc=f"aligning {model_name}", unit="group", disable=not progress, leave=False) if bar is None
          else contextlib.nullcontext(bar)) as bar:
        attention_seconds, attention_details = [0.0], {}

        def attention_fit(group: AttentionGroup) -> Callable[[], None]:
            def run() -> None:
                begin = time.perf_counter()
                transform.heads[group.name], attention_details[group.name] = fit_attention_group(ref_view, model_view, group, symmetries,
                                                                                                 device, model_groups[group.name])
                if recorded is not None:
                    record_distances(ref_view, model_view, group, recorded)
                bar.update(1)
                attention_seconds[0] += time.perf_counter() - begin
            return run

        attention_fits = ([attention_fit(group) for group in spec.attention]
                          if attention_on or (model_spec is not None and model_spec.num_heads != spec.num_heads) else [])
        start = time.perf_counter()
        if "ffn" in symmetries:  # the attention fits run while the FFN solvers do (fit_ffn's interleave)
            solved = fit_ffn(ref_view, model_view, spec, bar, device=device, model_spec=model_spec, distances=recorded,
                             interleave=attention_fits)
            for name, (perm, decrease) in solved.items():
                transform.ffn[name] = perm
                details[name] = ffn_details(perm, decrease)
        else:
            if model_spec is not None and model_spec.ffn_width != spec.ffn_width:  # unaligned: the identity embedding
                transform.ffn = {g.name: embedding(model_spec.ffn_width, g.width) for g in spec.ffn}
            for fit in attention_fits:
                fit()
        # each stage's own time; interleaved, the attention fits' time is taken out of the FFN stage's
        seconds["ffn"] = time.perf_counter() - start - attention_seconds[0]
        seconds["attention"] = attention_seconds[0]
        details.update(attention_details)  # after the FFNs', as when the stages ran one after the other
    return Fit(transform, details, seconds, distances=recorded or {})


DECREASES = ("objective_decrease", "heads_objective_decrease", "qk_objective_decrease", "vo_objective_decrease")
"""The details in which each part of a per-layer element reports how much it lowered its group's squared distance:
an FFN's permutation (:func:`solve_ffn`), a layer's head assignment, then its QK and VO rotations and scales
(:func:`~symmerge.match.attention.match_heads`, each measured from the previous part's result, so they add up)."""


def fit_gain(reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], spec: ModelSpec, fit: Fit) -> float:
    """By what fraction ``fit.transform`` lowers the distance ``‖T(θ) − θ_ref‖`` over the tensors its groups touch (0
    when it has no element), read off the fit instead of applying the element and measuring again: each group's
    squared distance before (``fit.distances``, recorded while the fit read the tensors; the tensors a fit did not
    record — Ray tasks record none — are measured here) less the decreases its parts report (``DECREASES``). The
    same value up to the rounding of the similarity and of the statistics the decreases are read from (float32, or
    bfloat16 for the FFN similarity where :func:`~symmerge.match.device.similarity_dtype` picks it): ~1e-5 of the
    gain, against the ``MIN_GAIN`` it is compared with. At LLaMA-7B the guard's own pass (both models read
    again, the element applied and the distances measured) was ~2-3 CPU s per layer."""
    transform, sq_before, decrease = fit.transform, 0.0, 0.0
    keys: list[str] = []
    for group in spec.groups():
        elements = transform.ffn if isinstance(group, FFNGroup) else transform.heads
        if group.name in elements:
            keys += sorted({s.key for s in group.slots()})
            decrease += sum(fit.details.get(group.name, {}).get(name, 0.0) for name in DECREASES)
    before = {k: d[0] for k, d in fit.distances.items()}
    for k in keys:
        if k not in before and k in model and k in reference and model[k].is_floating_point():
            before[k] = squared_distance(model[k], reference[k])
        sq_before += before.get(k, 0.0)
    if sq_before == 0:
        return 0.0
    return 1.0 - max(sq_before - decrease, 0.0) ** 0.5 / sq_before**0.5
