"""What limits activation matching on a zoo pair: the residual map ``Q`` or the per-layer elements?

Activation matching (``act:all,residual``) leaves a large loss barrier on vit-digits, while learned matching
reaches zero. An aligning element has two parts: the residual-stream orthogonal map ``Q`` and the per-layer
elements (FFN permutations, per-head transforms) chosen for it. This benchmark swaps the parts between elements
to find which one is at fault:

- the methods: vanilla (no alignment), weight matching ``all,residual``, ``act:all,residual`` (activation ``Q0``
  start + weight descent), activation one-shot (``Q0`` + activation per-layer elements), and learned matching
  (``learn_transform`` from weight matching's element, soft targets, a time/step budget);
- swaps (2a–2d): the learned ``Q_L`` with closed-form per-layer elements, the other ``Q``'s with the learned
  per-layer elements, a weight descent started from ``Q_L``, and the learned heads projected from GL(d_h) to
  O(d_h)·diag;
- learned runs with one part frozen (e1–e5): ``Q`` frozen and the per-layer elements learned, or the per-layer
  elements frozen (activation, weight, or none at all) and only ``Q`` learned;
- closed-form PCA candidates: ``Q`` sending B's stream principal components onto A's (matched, shifted, reversed),
  each with the activation per-layer elements computed for it.

Every aligned row interpolates fold(A) → T(fold(B)) in the untied folded module (vanilla: raw A → raw B). The
barrier is the midpoint one, ``L(.5) − (L(0) + L(1))/2``, on the zoo evaluator's held-out split, over ``--points``
evenly spaced t; *cut* is the share of raw vanilla's midpoint barrier removed. Calibration: 2048 training
examples in batches of 64.

The ``Q``'s are compared in the centred group (``Q 1 = 1``; d − 1 free dimensions): distance ‖Q1 − Q2‖_F / √d
(√2 for unrelated maps) and weighted by B's stream covariance. Stream geometry (16 calibration batches, all
layers pooled): B's participation ratio, the overlap of A's and Q-mapped B's top-k principal subspaces (1: same,
k/d: random), and the stream fit error ‖H_B Q − H_A‖ / ‖H_A‖ that activation matching minimises.
Writes ``benchmarks/results/residual_map_diagnosis.{md,json}``; about 6 × the learned budget plus ~2 min on 2 cores.

    python benchmarks/residual_map_diagnosis.py [--pair vit-digits] [--learn-seconds 80] [--learn-steps 2000] [--points 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from symmerge.data import load_calibration  # noqa: E402
from symmerge.evaluate import make_evaluator  # noqa: E402
from symmerge.evaluate.interpolation import interpolation_curve  # noqa: E402
from symmerge.groups import ModelTransform, apply_transform, parse_symmetries, require_residual  # noqa: E402
from symmerge.groups.heads import HeadTransform  # noqa: E402
from symmerge.groups.residual import fold_norms  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.io.hf import build_model, untied_config  # noqa: E402
from symmerge.match.activations import accumulate_statistics, per_layer_from_activations, record_activations, refine_residual  # noqa: E402
from symmerge.match.learned import learn_transform, path_loss, soft_target_loss  # noqa: E402
from symmerge.match.per_layer import fit_per_layer  # noqa: E402
from symmerge.match.residual import residual_descent, solve_residual  # noqa: E402
from symmerge.match.weights import match_weights  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402
from symmerge.zoo import build  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import git_commit  # noqa: E402  (the results record the commit that measured them)

RESULTS = Path(__file__).parent / "results"
STREAM_BATCHES = 16


def project_heads(t: ModelTransform, iters: int = 50) -> ModelTransform:
    """Each head's GL(d_h) factor M → the nearest R diag(s), R orthogonal (alternating Procrustes and scale)."""
    heads = {}
    for name, x in t.heads.items():
        out = {}
        for side, rot, sc in (("qk", x.qk_rotation, x.qk_scale), ("vo", x.vo_rotation, x.vo_scale)):
            M = (rot * sc.unsqueeze(-2)).double()
            s = M.norm(dim=-2)
            for _ in range(iters):
                u, _, vh = torch.linalg.svd(M @ torch.diag_embed(s))
                R = u @ vh
                s = (R * M).sum(-2).clamp_min(1e-8)
            out[side] = (R.float(), s.float())
        heads[name] = replace(x, qk_rotation=out["qk"][0], qk_scale=out["qk"][1], vo_rotation=out["vo"][0], vo_scale=out["vo"][1], general=False)
    return replace(t, heads=heads)


def gl_deviation(t: ModelTransform, projected: ModelTransform) -> tuple[float, float]:
    """Mean and max over heads and sides of ‖M − proj(M)‖_F / ‖M‖_F."""
    vals: list[float] = []
    for name, x in t.heads.items():
        p = projected.heads[name]
        for rot, sc, r2, s2 in ((x.qk_rotation, x.qk_scale, p.qk_rotation, p.qk_scale), (x.vo_rotation, x.vo_scale, p.vo_rotation, p.vo_scale)):
            M, P = rot * sc.unsqueeze(-2), r2 * s2.unsqueeze(-2)
            vals += ((M - P).flatten(1).norm(dim=1) / M.flatten(1).norm(dim=1)).tolist()
    return sum(vals) / len(vals), max(vals)


def agreement(x: ModelTransform, y: ModelTransform) -> dict:
    """Share of FFN and head permutation entries on which two elements agree."""
    ffn = sum(int((x.ffn[k] == y.ffn[k]).sum()) for k in x.ffn) / sum(x.ffn[k].numel() for k in x.ffn)
    heads = sum(int((x.heads[k].perm == y.heads[k].perm).sum()) for k in x.heads) / sum(x.heads[k].perm.numel() for k in x.heads)
    return {"ffn": ffn, "head_perm": heads}


def zoo_pair(pair: str) -> SimpleNamespace:
    """A zoo pair as the residual-map benchmarks study it: seeds 0 and 1 (``a``, ``b``), their config and spec, the
    ``all,residual`` classes, the residual kind, 2048 training examples of calibration in batches of 64 and the
    held-out evaluator."""
    a_dir, b_dir = build(pair, 0, progress=False), build(pair, 1, progress=False)
    ca = open_checkpoint(a_dir)
    a, b = load_state_dict(ca), load_state_dict(open_checkpoint(b_dir))
    spec = spec_for(ca.config, a.keys())
    chosen = parse_symmetries("all,residual")
    return SimpleNamespace(a_dir=a_dir, config=ca.config, a=a, b=b, spec=spec, chosen=chosen, per_layer=chosen - {"residual"},
                           kind=require_residual(spec).kind, evaluate=make_evaluator("zoo", a_dir),
                           batches=load_calibration("zoo", model_dir=a_dir, num_examples=2048, labels=True, batch_size=64))


def study(args: argparse.Namespace) -> dict:
    ts = [i / (args.points - 1) for i in range(args.points)]
    mid_i = ts.index(0.5)
    p = zoo_pair(args.pair)
    config, a, b, spec, chosen, per_layer, kind = p.config, p.a, p.b, p.spec, p.chosen, p.per_layer, p.kind
    batches, evaluate = p.batches, p.evaluate
    out: dict = {"pair": args.pair, "ts": ts, "residual_kind": kind, "rows": [], "learned": {}}

    W = match_weights(a, b, spec, chosen)
    ref_f, model_f = dict(W.folded_reference), fold_norms(b, spec.residual)
    ucfg = untied_config(config, True)
    ma, mb = build_model(ucfg, a), build_model(ucfg, b)
    sums, live = accumulate_statistics(ma, mb, batches, True)  # per-layer activations do not depend on Q or folding
    Q0 = solve_residual(sums["residual"], kind).float()
    d = Q0.shape[0]
    T = lambda t: apply_transform(model_f, spec, t)
    rotate = lambda Q: apply_transform(model_f, spec, ModelTransform(residual=Q))
    with_q = lambda t, Q: ModelTransform(ffn=t.ffn, heads=t.heads, residual=Q)
    ident = ModelTransform(ffn={g.name: torch.arange(int(W.transform.ffn[g.name].numel())) for g in spec.ffn},
                           heads={g.name: HeadTransform.identity(g.num_heads, g.head_dim, num_kv_heads=g.kv_heads) for g in spec.attention})

    def act_per_layer(Q: torch.Tensor) -> ModelTransform:
        """Activation per-layer elements for B rotated by Q (the O side read in that basis), with Q."""
        t, _ = per_layer_from_activations(sums, live, spec, per_layer, ref_f, rotate(Q))
        t.residual = Q
        return t

    def weight_per_layer(Q: torch.Tensor) -> ModelTransform:
        return with_q(fit_per_layer(ref_f, rotate(Q), spec, per_layer).transform, Q)

    module_u, module_raw = build_model(ucfg, ref_f), build_model(config, a)

    def run(key: str, label: str, state_b, raw: bool = False, note: str = "") -> dict:
        c = interpolation_curve(module_raw if raw else module_u, a if raw else ref_f, state_b, evaluate, ts, label=label)
        losses = c.losses
        mid = losses[mid_i] - (losses[0] + losses[-1]) / 2
        row = {"key": key, "setting": label, "note": note, "losses": losses, "mid": mid, "max_barrier": c.barrier(),
               "mid_acc": c.metrics[mid_i].get("accuracy")}
        out["rows"].append(row)
        print(f"{key:4s} {label:72s} mid {mid:8.4f}  acc {row['mid_acc']:.3f}  {note}", flush=True)
        return row

    def learn(key: str, model, init: ModelTransform, syms: frozenset, learn_ffn: bool = True) -> ModelTransform:
        step_loss = soft_target_loss(config, ref_f, model, True, batches)
        t0 = time.perf_counter()
        X, rec = learn_transform(ref_f, model, spec, init, path_loss(config, ref_f, untie=True), batches, symmetries=syms,
                                 steps=args.learn_steps, seconds=args.learn_seconds, seed=args.seed, step_loss=step_loss, learn_ffn=learn_ffn)
        out["learned"][key] = {"steps": rec["steps"], "best_step": rec["best_step"], "seconds": time.perf_counter() - t0,
                               "halvings": rec["halvings"], "held_out_mid_by_step": [(e[0], e[2]) for e in rec["evaluations"]]}
        print(f"{key}: {rec['steps']} steps, best {rec['best_step']}, {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        return X

    def learn_q_only(key: str, frozen: ModelTransform, start: torch.Tensor) -> ModelTransform:
        return learn(key, model_f, with_q(frozen, start), frozenset({"residual"}), learn_ffn=False)

    def learn_per_layer_only(key: str, Q: torch.Tensor, start: ModelTransform) -> ModelTransform:
        X = learn(key, rotate(Q), ModelTransform(ffn=start.ffn, heads=start.heads), per_layer)
        return with_q(X, Q)

    # the methods
    fit = refine_residual(a, b, spec, chosen, Q0)
    A = fit.transform
    if A.residual is None:
        A.residual = Q0
    L = learn("learn", model_f, W.transform, chosen)
    Wt = W.transform
    QL, QA, QW = L.residual, A.residual, Wt.residual
    vanilla = run("1", "vanilla, raw A → raw B", b, raw=True)
    folded = run("1", "vanilla, fold A → fold B", model_f)
    run("1", "weights `all,residual`", T(Wt))
    run("1", "`act:all,residual` (act Q0 start + weight descent)", T(A))
    lr = out["learned"]["learn"]
    run("1", f"`learn:all,residual`, {args.learn_seconds:g} s", T(L), note=f"{lr['steps']} steps, best {lr['best_step']}")
    run("–", "act one-shot: Q0 + act per-layer", T(act_per_layer(Q0)))
    out["perm_agreement_with_learned"] = {"weights": agreement(Wt, L), "act": agreement(A, L)}

    # swaps
    act_QL = act_per_layer(QL)
    run("2a", "Q_L + act per-layer computed for Q_L", T(act_QL))
    run("2b", "Q_act (after descent) + learned per-layer", T(with_q(L, QA)))
    run("2b", "Q0 (one-shot) + learned per-layer", T(with_q(L, Q0)))
    run("2b", "Q_W + learned per-layer", T(with_q(L, QW)))
    weight_QL = weight_per_layer(QL)
    run("2c", "Q_L fixed + weight per-layer fit on Q_L(B)", T(weight_QL))
    desc = residual_descent(ref_f, model_f, spec, per_layer, start=QL)
    if desc.transform.residual is None:
        desc.transform.residual = QL
    moved = float((desc.transform.residual.double() - QL.double()).norm() / math.sqrt(d))
    run("2c'", "weight descent started from Q_L", T(desc.transform), note=f"Q drifts {moved:.2f} from Q_L")
    projected = project_heads(L)
    dev = gl_deviation(L, projected)
    run("2d", "learned, GL(d_h) heads projected to O(d_h)·diag", T(projected), note=f"rel. deviation mean {dev[0]:.2f}, max {dev[1]:.2f}")
    run("–", "Q_L + learned heads + act FFN perms (for Q_L)", T(ModelTransform(ffn=act_QL.ffn, heads=L.heads, residual=QL)))
    run("–", "Q_L + learned FFN + act heads (for Q_L)", T(ModelTransform(ffn=L.ffn, heads=act_QL.heads, residual=QL)))
    run("–", "Q_L + learned FFN + weight heads (fit on Q_L(B))", T(ModelTransform(ffn=L.ffn, heads=weight_QL.heads, residual=QL)))
    out["gl_deviation_mean_max"] = dev
    out["descent_from_QL"] = {"steps": len(desc.history) - 1, "Q_moved": moved}

    # one part frozen, the other learned
    act_Q0 = act_per_layer(Q0)
    run("e1", "Q frozen at Q_act, per-layer learned (from the act element)", T(learn_per_layer_only("e1", QA, A)))
    run("e2", "Q frozen at Q_L, per-layer learned (from act per-layer for Q_L)", T(learn_per_layer_only("e2", QL, act_QL)))
    Qe = {}
    for key, label, frozen, start in (("e3", "per-layer frozen at act one-shot, only Q learned (from Q0)", act_Q0, Q0),
                                      ("e4", "per-layer frozen at the weight element, only Q learned (from Q_W)", Wt, QW),
                                      ("e5", "per-layer identity (no FFN/head alignment), only Q learned (from Q0)", ident, Q0)):
        X = learn_q_only(key, frozen, start)
        Qe[key] = X.residual
        run(key, label, T(X))

    # stream geometry: residual streams of A and B (unfolded modules) on the first calibration batches, layers pooled
    HA: list[torch.Tensor] = []
    HB: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches[:STREAM_BATCHES]:
            ra, rb = record_activations(ma, live, batch, True)["residual"], record_activations(mb, live, batch, True)["residual"]
            HA = [x.double() for x in ra] if not HA else [torch.cat([h, x.double()]) for h, x in zip(HA, ra)]
            HB = [x.double() for x in rb] if not HB else [torch.cat([h, x.double()]) for h, x in zip(HB, rb)]
    CA, CB = sum(h.T @ h for h in HA), sum(h.T @ h for h in HB)

    # closed-form PCA candidates (centred group: Q 1 = 1, so B's PCs orthogonal to the ones vector map onto A's)
    P = torch.eye(d, dtype=torch.float64) - 1.0 / d
    VA, VB = (torch.linalg.eigh(P @ C @ P)[1].flip(1)[:, : d - 1] for C in (CA, CB))
    n = d - 1
    maps = {"reversed": ("B's top PCs → A's bottom", list(reversed(range(n)))),
            "matched": ("B's j-th PC → A's j-th", list(range(n))),
            "shifted 16": ("B's top-16 → A's PCs 17–32", [(j + 16) % n for j in range(n)]),
            f"shifted {n // 2}": ("B's top → A's middle", [(j + n // 2) % n for j in range(n)])}
    for name, (desc_s, sigma) in maps.items():
        Q = (VB @ VA[:, sigma].T + torch.ones(d, d, dtype=torch.float64) / d).float()  # row convention h → h Q
        run("p", f"PCA {name} ({desc_s}) + act per-layer", T(act_per_layer(Q)))

    # distances between Q's and stream geometry
    Qs = {"identity": torch.eye(d), "Q0 (act one-shot)": Q0, "Q_act (after descent)": QA, "Q_W (weights)": QW, "Q_L (learned)": QL,
          **{f"Q_{k} (only Q learned)": v for k, v in Qe.items()}}
    Qs = {k: v.double() for k, v in Qs.items()}
    dist = lambda x, y: float((x - y).norm() / math.sqrt(d))
    wdist = lambda x, y: math.sqrt(float(torch.trace((x - y).T @ CB @ (x - y)) / torch.trace(CB)))
    ev = torch.linalg.eigvalsh(CB).flip(0)
    geometry = {"d": d, "stream_batches": STREAM_BATCHES, "layers": len(HA), "positions": HA[0].shape[0],
                "participation_ratio_B": float(ev.sum() ** 2 / (ev**2).sum()),
                "top_k_energy_B": {k: float(ev[:k].sum() / ev.sum()) for k in (1, 2, 4, 8, 16)}, "maps": {}}
    UA = {k: torch.linalg.eigh(CA)[1][:, -k:] for k in (4, 8)}
    UB = {k: torch.linalg.eigh(CB)[1][:, -k:] for k in (4, 8)}
    for name, Q in Qs.items():
        pooled = math.sqrt(sum(float((hb @ Q - ha).norm() ** 2) for ha, hb in zip(HA, HB)) / sum(float(ha.norm() ** 2) for ha in HA))
        geometry["maps"][name] = {
            "dist_to": {o: dist(Q, Qs[o]) for o in ("Q0 (act one-shot)", "Q_act (after descent)", "Q_W (weights)", "Q_L (learned)")},
            "cov_weighted_dist_to_Q_L": wdist(Q, Qs["Q_L (learned)"]),
            "overlap_top_k": {k: float((UA[k].T @ (Q.T @ UB[k])).norm() ** 2 / k) for k in (4, 8)},
            "stream_fit_error": pooled,
            "stream_fit_error_per_layer": [float((hb @ Q - ha).norm() / ha.norm()) for ha, hb in zip(HA, HB)]}
    out["geometry"] = geometry
    out["endpoints"] = {"L0": vanilla["losses"][0], "L1": vanilla["losses"][-1]}
    out["vanilla_mid"], out["vanilla_folded_mid"] = vanilla["mid"], folded["mid"]
    return out


def markdown(r: dict, meta: dict) -> str:
    base = r["vanilla_mid"]
    lr = r["learned"]["learn"]
    out = [f"# Residual map diagnosis: {r['pair']}", "",
           f"Commit {meta['commit']}, {meta['date']}; load average {meta['load_start'][0]:.2f} at start, {meta['load_end'][0]:.2f} at end; "
           f"{meta['cpus']} CPUs, torch {torch.__version__}, {meta['threads']} threads. Endpoints (held-out split): "
           f"L0 = {r['endpoints']['L0']:.4f}, L1 = {r['endpoints']['L1']:.4f}. {len(r['ts'])} points on the path; "
           "**mid** = L(.5) − (L0 + L1)/2; **cut** = share of raw vanilla's mid removed. Learned runs: `learn_transform`, soft targets, "
           f"budget {meta['learn_seconds']:g} s / {meta['learn_steps']} steps, seed {meta['seed']} (the learned element: {lr['steps']} steps, "
           f"best {lr['best_step']}). Aligned rows: fold(A) → T(fold(B)) in the untied folded module; residual kind `{r['residual_kind']}`.", "",
           "| # | element (Q + per-layer) | mid | cut | mid acc | note |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cut = "–" if row["setting"].startswith("vanilla") else f"{1 - row['mid'] / base:.0%}"
        note = row["note"]
        if row["key"] in r["learned"] and row["key"] != "1":
            info = r["learned"][row["key"]]
            note = f"{info['steps']} steps, best {info['best_step']}"
        out.append(f"| {row['key']} | {row['setting']} | {row['mid']:.3f} | {cut} | {row['mid_acc']:.1%} | {note} |")
    ag = r["perm_agreement_with_learned"]
    e3 = r["learned"]["e3"]["held_out_mid_by_step"]
    out += ["", f"Permutation agreement with the learned element: weights FFN {ag['weights']['ffn']:.0%}, heads {ag['weights']['head_perm']:.0%}; "
            f"act FFN {ag['act']['ffn']:.0%}, heads {ag['act']['head_perm']:.0%}.",
            "e3 held-out midpoint loss by step (learned-run evaluations): " + ", ".join(f"{s}: {v:.3f}" for s, v in e3[:4]) + f" … {e3[-1][0]}: {e3[-1][1]:.3f}.", ""]
    g = r["geometry"]
    out += [f"## Residual maps (d = {g['d']}, centred group)", "",
            f"Stream statistics: {g['stream_batches']} calibration batches, {g['layers']} layers pooled, {g['positions']} positions per layer. "
            f"B's stream participation ratio **{g['participation_ratio_B']:.1f}**; energy in the top 1/2/4/8/16 directions: "
            + " / ".join(f"{v:.0%}" for v in g["top_k_energy_B"].values()) + ".", "",
            "Distances ‖Q1 − Q2‖_F/√d (√2 ≈ 1.414 for unrelated maps); cov-weighted: by B's stream covariance. Overlap: A's top-k principal "
            f"subspace vs B's mapped by Q (1 = same, k/d = random: {4 / g['d']:.3f} / {8 / g['d']:.3f}). Fit error ‖H_B Q − H_A‖/‖H_A‖, pooled.", "",
            "| Q | to Q0 | to Q_act | to Q_W | to Q_L | cov-weighted to Q_L | overlap k=4 | overlap k=8 | fit error |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in g["maps"].items():
        dt = m["dist_to"]
        out.append(f"| {name} | {dt['Q0 (act one-shot)']:.3f} | {dt['Q_act (after descent)']:.3f} | {dt['Q_W (weights)']:.3f} | {dt['Q_L (learned)']:.3f} | "
                   f"{m['cov_weighted_dist_to_Q_L']:.3f} | {m['overlap_top_k'][4]:.2f} | {m['overlap_top_k'][8]:.2f} | {m['stream_fit_error']:.2f} |")
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="vit-digits")
    parser.add_argument("--learn-seconds", type=float, default=80.0, help="Wall-clock budget of each learned run (six runs).")
    parser.add_argument("--learn-steps", type=int, default=2000, help="Step cap of each learned run.")
    parser.add_argument("--points", type=int, default=5, help="Points on the path, t = 0 … 1 (odd, so that t = 0.5 is one).")
    parser.add_argument("--seed", type=int, default=0, help="Learned runs' seed (batch order and t).")
    args = parser.parse_args()
    if args.points < 3 or args.points % 2 == 0:
        parser.error("--points must be odd and at least 3")
    meta = {"commit": git_commit() or "unknown", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": os.getloadavg(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "learn_seconds": args.learn_seconds, "learn_steps": args.learn_steps, "seed": args.seed, "points": args.points}
    t0 = time.perf_counter()
    result = study(args)
    meta["load_end"], meta["seconds"] = os.getloadavg(), time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    text = markdown(result, meta)
    (RESULTS / "residual_map_diagnosis.md").write_text(text)
    (RESULTS / "residual_map_diagnosis.json").write_text(json.dumps({"meta": meta, **result}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
