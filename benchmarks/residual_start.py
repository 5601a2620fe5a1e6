"""Where should the residual coordinate descent start? Identity start vs anchored start, round by round.

For each zoo pair (seed 0 vs seed 1) and the data-free setting ``all,residual``: the descent from the identity
start (the first ``Q`` solved from the full correlation, every per-layer element at the identity) and from the
anchored start (the first ``Q`` solved from the slots no per-layer group moves; :func:`symmerge.match.residual.anchored_start`).
After each accepted round: the weight distance (the objective; per tensor group) and the loss barrier on the
held-out split (the fusion-quality benchmark's settings: 11 points). References: vanilla (``none``), per-layer only
(``all``), and ``symmerge.align(..., "all,residual")`` end to end (which keeps the start with the lower distance).
Writes ``benchmarks/results/residual_start.{md,json}``.

    python benchmarks/residual_start.py [--pairs vit-digits vit-fmnist gpt2-shakespeare] [--points 11] [--max-curves 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import symmerge  # noqa: E402
from symmerge.evaluate import grouped_distance, interpolation_curve, make_evaluator, model_for  # noqa: E402
from symmerge.groups import apply_transform, parse_symmetries  # noqa: E402
from symmerge.groups.residual import fold_norms  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.match.residual import anchored_start, residual_descent  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402
from symmerge.zoo import build  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GROUP_ORDER = ("embeddings", "attention", "ffn", "norms", "head", "other")


def rounds_to_curve(n: int, max_curves: int) -> list[int]:
    """Which rounds (1..n) get a barrier: all if few, else the first three, a spread, and the last."""
    if n <= max_curves:
        return list(range(1, n + 1))
    extra = max(0, max_curves - 4)
    return sorted({1, 2, 3, n} | {round(3 + (n - 3) * (k + 1) / (extra + 1)) for k in range(extra)})


def pair_study(name: str, points: int, max_curves: int) -> dict:
    a_dir, b_dir = build(name, 0, progress=False), build(name, 1, progress=False)
    ca, cb = open_checkpoint(a_dir), open_checkpoint(b_dir)
    a, b = load_state_dict(ca), load_state_dict(cb)
    config = ca.config
    spec = spec_for(config, a.keys())
    evaluate = make_evaluator("zoo", a_dir)
    ts = [i / (points - 1) for i in range(points)]
    plain, untied = model_for(config, a, False), None

    def barrier(x, y, tied_model) -> float:
        return interpolation_curve(tied_model, x, y, evaluate, ts).barrier()

    out: dict = {"pair": name, "references": {}, "starts": {}}
    out["references"]["none"] = {"barrier": barrier(a, b, plain), "distance": grouped_distance(a, b, spec), "seconds": 0.0}
    start = time.perf_counter()
    r = symmerge.align(a, b, config=config, spec=spec, symmetries="all")
    secs = time.perf_counter() - start
    out["references"]["all"] = {"barrier": barrier(a, r.state_dict, plain), "distance": grouped_distance(a, r.state_dict, spec), "seconds": secs}
    print(f"{name}: none {out['references']['none']['barrier']:.4f}, all {out['references']['all']['barrier']:.4f} ({secs:.1f} s)", flush=True)

    residual = spec.residual
    a_f, b_f = fold_norms(a, residual), fold_norms(b, residual)
    untied = model_for(config, a_f, True)
    out["references"]["folded, no map"] = {"barrier": barrier(a_f, b_f, untied), "distance": grouped_distance(a_f, b_f, spec), "seconds": 0.0}
    per_layer = parse_symmetries("all") - {"residual"}
    for start_name in ("identity", "anchored"):
        t0 = time.perf_counter()
        q0 = anchored_start(a_f, b_f, spec, per_layer) if start_name == "anchored" else None
        descent = residual_descent(a_f, b_f, spec, per_layer, start=q0)
        seconds, history, rounds = descent.seconds, descent.history, descent.steps
        secs = time.perf_counter() - t0
        curved = rounds_to_curve(len(rounds), max_curves)
        per_round = []
        for i, transform in enumerate(rounds, 1):
            aligned = apply_transform(b, spec, transform)
            row = {"round": i, "distance": grouped_distance(a_f, aligned, spec)}
            if i in curved:
                row["barrier"] = barrier(a_f, aligned, untied)
            per_round.append(row)
            print(f"{name} {start_name} round {i}: distance {history[i]:.4f}" + (f", barrier {row['barrier']:.4f}" if "barrier" in row else ""), flush=True)
        out["starts"][start_name] = {"history": history, "rounds": per_round, "seconds": secs, "stage_seconds": seconds}
        print(f"{name} {start_name}: {len(rounds)} rounds, distance {history[0]:.4f} → {history[-1]:.4f} in {secs:.1f} s", flush=True)
    start = time.perf_counter()
    r = symmerge.align(a, b, config=config, spec=spec, symmetries="all,residual")
    secs = time.perf_counter() - start
    kept = r.report.groups[-1].details["start"]
    final = out["starts"][kept]["rounds"][-1] if out["starts"][kept]["rounds"] else None
    out["chosen"] = {"start": kept, "seconds": secs, "distance": r.report.distance_after,
                     "barrier": final.get("barrier") if final else out["references"]["folded, no map"]["barrier"],
                     "final_distance": r.report.groups[-1].details["final_distance"]}
    print(f"{name}: align(all,residual) keeps the {kept} start, distance {r.report.distance_after:.4f}, {secs:.1f} s", flush=True)
    return out


def _groups(d: dict) -> str:
    return " / ".join(f"{d[g]:.3g}" if g in d else "–" for g in GROUP_ORDER[:5])


def markdown(pairs: list[dict], machine: dict) -> str:
    out = ["# Residual descent: identity start vs anchored start", "",
           f"Machine: {machine['cpus']} CPUs, load average at start {machine['load'][0]:.2f}; torch {torch.__version__}. "
           "Pairs: zoo seed 0 vs seed 1, data-free `all,residual`. Barrier = max_t [L(θ(t)) − ((1−t) L(A) + t L(B))] over "
           "11 values of t on the held-out split. Distances for residual settings are between the folded models. "
           "Group distances: embeddings / attention / ffn / norms / head.", ""]
    for p in pairs:
        refs, starts, chosen = p["references"], p["starts"], p["chosen"]
        out += [f"## {p['pair']}", "",
                "| setting | barrier | distance | by group (emb / attn / ffn / norms / head) | align s |", "|---|---|---|---|---|"]
        for label, row in refs.items():
            out.append(f"| `{label}` | {row['barrier']:.4f} | {row['distance']['total']:.4g} | {_groups(row['distance'])} | {row['seconds']:.1f} |")
        for label, s in starts.items():
            last = s["rounds"][-1] if s["rounds"] else None
            if last:
                out.append(f"| `all,residual`, {label} start (final) | {last.get('barrier', float('nan')):.4f} | {last['distance']['total']:.4g} | "
                           f"{_groups(last['distance'])} | {s['seconds']:.1f} |")
        out.append(f"| `all,residual` via `align` (keeps **{chosen['start']}**) | {chosen['barrier']:.4f} | {chosen['distance']:.4g} | | {chosen['seconds']:.1f} |")
        out += ["", "Per round (distance; barrier where evaluated):", "",
                "| round | identity: distance | identity: barrier | anchored: distance | anchored: barrier |", "|---|---|---|---|---|"]
        n = max(len(s["history"]) for s in starts.values())
        for i in range(n):
            cells = []
            for label in ("identity", "anchored"):
                s = starts[label]
                if i < len(s["history"]):
                    bar = refs["folded, no map"]["barrier"] if i == 0 else s["rounds"][i - 1].get("barrier")
                    cells += [f"{s['history'][i]:.4f}", f"{bar:.4f}" if bar is not None else ""]
                else:
                    cells += ["", ""]
            out.append(f"| {i} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["vit-digits", "vit-fmnist", "gpt2-shakespeare"])
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--max-curves", type=int, default=8, help="At most this many barrier curves per start.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    machine = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "residual_start.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    done = {p["pair"]: p for p in previous.get("pairs", [])}  # pairs not asked for this time are kept
    for name in args.pairs:
        done[name] = pair_study(name, args.points, args.max_curves)
    pairs = [done[n] for n in ("vit-digits", "vit-fmnist", "gpt2-shakespeare") if n in done]
    text = markdown(pairs, machine)
    (RESULTS / "residual_start.md").write_text(text)
    path.write_text(json.dumps({"machine": machine, "pairs": pairs}, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
