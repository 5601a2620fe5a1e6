"""Closed-form residual maps from activations: which statistic of the streams gives a ``Q`` that merges well?

Activation matching (``act:all,residual``) misses its ≥ 80 % barrier-cut target on vit-digits, and
``residual_map_diagnosis.py`` traced the miss to the residual map ``Q``: the correlation of the two models'
residual streams, ``M = Σ_layers H_B^T H_A``, stacks B's dominant stream directions onto A's, while the maps that
reach zero barrier (learned) do not. This benchmark tries the closed-form alternatives one would reach for next,
each a Procrustes solution in the residual group (centred for pre-LN ViTs/GPT-2):

- ``raw``: ``M`` as activation matching uses it (``Q0``);
- ``per-layer normalised``: each layer's ``H_B^T H_A`` divided by ``‖H_A‖ ‖H_B‖`` (deep layers' larger norms no
  longer dominate);
- ``token-normalised``: every position centred and scaled to norm √d first (what the next LayerNorm reads);
- ``first layer`` / ``last layer``: one layer's correlation only;
- ``CCA ε``: the whitened correlation ``C_B^{-1/2} M C_A^{-1/2}`` (``C`` the stream covariances, eigenvalues
  floored at ``ε`` × the largest): every stream direction counts alike, whatever its energy;
- ``stream gradients``: ``Σ G_B^T G_A`` with ``G`` the loss gradients w.r.t. the stream (they transform like the
  stream under an orthogonal ``Q``);
- ``alternating``: activation per-layer elements and ``Q`` from the *weights* given them (one Procrustes), five
  times from ``raw``.

Each ``Q`` is scored three ways: with the activation per-layer elements computed for it, with the weight-matching
per-layer fit on ``Q(B)``, and as the start of weight matching's coordinate descent (what ``act:all,residual``
does with ``raw``). Midpoint barrier ``L(.5) − (L(0) + L(1))/2`` of fold(A) → T(fold(B)) on the zoo evaluator's
held-out split; *cut* = share of raw vanilla averaging's midpoint barrier removed. Calibration: 2048 training
examples in batches of 64. Writes ``benchmarks/results/activation_residual_candidates.{md,json}``; ~1 min per
ViT pair and ~3 min per GPT-2 pair on 2 cores.

    python benchmarks/activation_residual_candidates.py [--pairs vit-digits vit-fmnist-w256 gpt2-shakespeare]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from symmerge.evaluate.interpolation import interpolation_curve  # noqa: E402
from symmerge.groups import ModelTransform, apply_transform  # noqa: E402
from symmerge.groups.residual import centered_basis, embed_centered, fold_norms, residual_correlation  # noqa: E402
from symmerge.io.hf import build_model, untied_config  # noqa: E402
from symmerge.match.activations import accumulate_statistics, per_layer_from_activations, record_activations, refine_residual  # noqa: E402
from symmerge.match.per_layer import fit_per_layer  # noqa: E402
from symmerge.match.procrustes import procrustes  # noqa: E402
from symmerge.match.residual import solve_residual  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import git_commit  # noqa: E402
from residual_map_diagnosis import zoo_pair  # noqa: E402  (the pair as the diagnosis loads it)

RESULTS = Path(__file__).parent / "results"
SCORINGS = ("activation per-layer", "weight per-layer", "weight descent from Q")


def stream_statistics(ma: torch.nn.Module, mb: torch.nn.Module, live, batches, language_model: bool) -> dict:
    """Per layer, float64: cross and self products of the raw streams, of the token-normalised streams, and of the
    loss gradients w.r.t. the streams."""
    stats: dict[str, list[torch.Tensor]] = {}

    def add(key: str, layer: int, value: torch.Tensor) -> None:
        stats.setdefault(key, [])
        if len(stats[key]) <= layer:
            stats[key].append(value)
        else:
            stats[key][layer] += value

    def token_normalised(h: torch.Tensor) -> torch.Tensor:
        h = h - h.mean(1, keepdim=True)
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(h.shape[1])

    def gradients(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
        model.eval()
        inputs = dict(batch) | ({"labels": batch["input_ids"]} if language_model else {})
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[:-1]  # as record_activations: the last entry is not the residual stream in decoders
        for h in hidden:
            h.retain_grad()
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return [h.grad.detach().double().reshape(-1, h.shape[-1]) for h in hidden]

    for batch in batches:
        with torch.no_grad():
            ra, rb = (record_activations(m, live, batch, True)["residual"] for m in (ma, mb))
        for layer, (ha, hb) in enumerate(zip(ra, rb)):
            ha, hb = ha.double(), hb.double()
            add("M", layer, hb.T @ ha), add("CA", layer, ha.T @ ha), add("CB", layer, hb.T @ hb)
            na, nb = token_normalised(ha), token_normalised(hb)
            add("Mt", layer, nb.T @ na)
        for layer, (ga, gb) in enumerate(zip(gradients(ma, batch), gradients(mb, batch))):
            add("MG", layer, gb.T @ ga)
    return stats


def candidates(stats: dict, kind: str, d: int) -> dict[str, torch.Tensor]:
    layers = range(len(stats["M"]))
    solve = lambda m: solve_residual(m, kind).float()  # noqa: E731
    v = centered_basis(d).double() if kind == "centered" else torch.eye(d, dtype=torch.float64)
    embed = embed_centered if kind == "centered" else (lambda q: q)

    def cca(eps: float) -> torch.Tensor:
        m, ca, cb = (v.T @ sum(stats[k]) @ v for k in ("M", "CA", "CB"))

        def inverse_sqrt(c: torch.Tensor) -> torch.Tensor:
            w, u = torch.linalg.eigh(c)
            return u @ torch.diag((w.clamp_min(0) + eps * w.max()) ** -0.5) @ u.T
        return embed(procrustes(inverse_sqrt(cb) @ m @ inverse_sqrt(ca))).float()

    norms = [math.sqrt(float(stats["CA"][i].trace() * stats["CB"][i].trace())) for i in layers]
    return {"raw": solve(sum(stats["M"])),
            "per-layer normalised": solve(sum(stats["M"][i] / norms[i] for i in layers)),
            "token-normalised": solve(sum(stats["Mt"])),
            "first layer": solve(stats["M"][0]),
            "last layer": solve(stats["M"][-1]),
            "CCA ε=1e-3": cca(1e-3), "CCA ε=1e-2": cca(1e-2), "CCA ε=1e-1": cca(1e-1),
            "stream gradients": solve(sum(stats["MG"]))}


def pair_study(pair: str) -> dict:
    p = zoo_pair(pair)
    config, a, b, spec, chosen, per_layer, kind = p.config, p.a, p.b, p.spec, p.chosen, p.per_layer, p.kind
    batches, evaluate = p.batches, p.evaluate
    untied = untied_config(config, True)
    ma, mb = build_model(untied, a), build_model(untied, b)
    sums, live = accumulate_statistics(ma, mb, batches, True)
    stats = stream_statistics(ma, mb, live, batches, language_model="input_ids" in batches[0])
    ref_f, model_f = fold_norms(a, spec.residual), fold_norms(b, spec.residual)
    d = sums["residual"].shape[0]
    module_u, module_raw = build_model(untied, ref_f), build_model(config, a)
    rotate = lambda q: apply_transform(model_f, spec, ModelTransform(residual=q))  # noqa: E731

    def midpoint(state_b, raw: bool = False) -> tuple[float, float | None]:
        curve = interpolation_curve(module_raw if raw else module_u, a if raw else ref_f, state_b, evaluate, [0.0, 0.5, 1.0], label="")
        losses = curve.losses
        return losses[1] - (losses[0] + losses[2]) / 2, curve.metrics[1].get("accuracy")

    def act_elements(q: torch.Tensor) -> ModelTransform:
        t, _ = per_layer_from_activations(sums, live, spec, per_layer, ref_f, rotate(q))
        t.residual = q
        return t

    def scored(q: torch.Tensor, how: str) -> ModelTransform:
        if how == "activation per-layer":
            return act_elements(q)
        if how == "weight per-layer":
            t = fit_per_layer(ref_f, rotate(q), spec, per_layer).transform
            t.residual = q
            return t
        fit = refine_residual(a, b, spec, chosen, q)
        if fit.transform.residual is None:
            fit.transform.residual = q
        return fit.transform

    qs = candidates(stats, kind, d)
    q = qs["raw"]
    for _ in range(5):
        t = act_elements(q)
        moved = apply_transform(model_f, spec, ModelTransform(ffn=t.ffn, heads=t.heads))
        q = solve_residual(residual_correlation(moved, ref_f, spec.residual), kind).float()
    qs["alternating"] = q
    vanilla, _ = midpoint(b, raw=True)
    out = {"pair": pair, "vanilla_mid": vanilla, "rows": []}
    print(f"{pair}: vanilla midpoint barrier {vanilla:.3f}", flush=True)
    for name, q in qs.items():
        row = {"candidate": name}
        for how in SCORINGS:
            mid, acc = midpoint(apply_transform(model_f, spec, scored(q, how)))
            row[how] = {"mid": mid, "cut": 1 - mid / vanilla, "acc": acc}
        out["rows"].append(row)
        print(f"  {name:22s} " + "  ".join(f"{how}: {100 * row[how]['cut']:5.1f}%" for how in SCORINGS), flush=True)
    return out


def markdown(out: dict) -> str:
    lines = ["# Closed-form residual maps from activations (`benchmarks/activation_residual_candidates.py`)", "",
             f"{out['date']}, commit {out['commit']}; load average {out['load'][0]:.2f} → {out['load'][1]:.2f}; "
             f"{out['seconds']:.0f} s. Cell: barrier cut vs raw vanilla averaging (midpoint barrier, midpoint accuracy "
             "where the pair has one). `raw` scored with the weight descent is today's `act:all,residual`.", ""]
    for p in out["pairs"]:
        lines += [f"## {p['pair']} (vanilla midpoint barrier {p['vanilla_mid']:.3f})", "",
                  "| Q from | " + " | ".join(SCORINGS) + " |", "|---|" + "---|" * len(SCORINGS)]
        for r in p["rows"]:
            cell = lambda s: f"{100 * s['cut']:.0f}% ({s['mid']:.3f}" + (f", {100 * s['acc']:.1f}%)" if s["acc"] is not None else ")")  # noqa: E731
            lines.append(f"| {r['candidate']} | " + " | ".join(cell(r[h]) for h in SCORINGS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["vit-digits", "vit-fmnist-w256", "gpt2-shakespeare"])
    args = parser.parse_args()
    load0, start = os.getloadavg()[0], time.perf_counter()
    pairs = [pair_study(p) for p in args.pairs]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(), "load": [load0, os.getloadavg()[0]],
           "seconds": time.perf_counter() - start, "pairs": pairs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "activation_residual_candidates.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "activation_residual_candidates.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
