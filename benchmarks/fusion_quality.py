"""Does alignment make merges better? Loss barriers and merged accuracy on the zoo's independently trained pairs.

For each pair (two seeds of one zoo recipe) and each alignment setting — vanilla averaging, Git Re-Basin FFN
matching, the seed paper's method and its ablations, + head permutations, + the residual map, and with data:
activation and learned matching — the linear path between A and B' is evaluated on the held-out split
(calibration for activation/learned matching comes from the training split). Also a K-model merge of digits ViTs.
Writes ``benchmarks/results/fusion_quality.{md,json}`` and one plot per pair.

    python benchmarks/fusion_quality.py [--pairs vit-digits vit-fmnist gpt2-shakespeare] [--points 11] [--learn-steps 100]
    python benchmarks/fusion_quality.py --pairs vit-fmnist-w256 gpt2-shakespeare-w256 --kway --no-smollm2   # GLMC's shapes

Pairs and the K-way/SmolLM2 sections not run this time are kept from the stored fusion_quality.json, so the report
always shows every pair measured so far (each with the load average of its own run). ``--settings`` runs a subset
of the rows and replaces only those rows of a stored pair; every row records when, on which commit and at which
load it was measured, and the report lists the rows measured in another run than the pair's latest.

    python benchmarks/fusion_quality.py --pairs vit-fmnist --settings learn:all,residual --kway --no-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import symmerge  # noqa: E402
from symmerge.data import load_calibration  # noqa: E402
from symmerge.evaluate import Curve, make_evaluator, model_for, run_study  # noqa: E402
from symmerge.evaluate.plots import plot_curves  # noqa: E402
from symmerge.groups.residual import with_untied_head  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.io.hf import load_weights  # noqa: E402
from symmerge.zoo import build, read_record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import git_commit  # noqa: E402  (the rows record the commit that measured them)

RESULTS = Path(__file__).parent / "results"
SETTINGS = [
    ("none", "vanilla averaging"),
    ("ffn", "FFN permutation only (Git Re-Basin weight matching)"),
    ("ffn,qk,vo,scale", "the seed paper's method"),
    ("all", "+ exact head permutation (per-layer classes)"),
    ("all,residual", "+ residual-stream map (data-free; `auto` for pre-LN / RMSNorm families)"),
    ("act:all,residual", "activation matching (the activations' residual map starts the weight descent)"),
    ("learn:all,residual", "learned matching (residual map, per-head GL(d_h), FFN permutations; random t)"),
    ("all,residual+repair", "data-free + REPAIR of FFN pre-activation statistics"),
    ("learn:all,residual+repair", "learned + REPAIR"),
]
PAIRS = ["vit-digits", "vit-fmnist", "gpt2-shakespeare", "vit-fmnist-w256", "gpt2-shakespeare-w256"]  # report order
WHAT = dict(SETTINGS)
GLMC = {  # Theus et al. 2025, Table 2: vanilla → data-free weight matching → learned (their models and data, not ours)
    "ViT CIFAR-10": (1.69, 0.36, 0.00), "ViT CIFAR-100": (2.46, 0.69, 0.00), "ViT Tiny ImageNet": (2.84, 0.47, 0.00),
    "GPT-2 Tiny Shakespeare": (2.02, 0.34, 0.02), "GPT-2 BookCorpus": (4.34, 1.56, 0.42),
}


def pair_study(name: str, points: int, learn_steps: int, learn_seconds: float | None, settings: list[str]) -> dict:
    a_dir, b_dir = build(name, 0), build(name, 1)
    ca, cb = open_checkpoint(a_dir), open_checkpoint(b_dir)
    a, b = load_state_dict(ca), load_state_dict(cb)
    evaluate = make_evaluator("zoo", a_dir)
    calibration = load_calibration("zoo", model_dir=a_dir, num_examples=2048, labels=True, batch_size=64)
    start = time.perf_counter()
    study = run_study(a, b, ca.config, settings, evaluate, points=points, calibration=calibration, learn_steps=learn_steps,
                      learn_seconds=learn_seconds)
    measured = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} @{git_commit()}, load {os.getloadavg()[0]:.1f}"
    rows = [{**row, "measured": measured, "ts": s.curve.ts, "metrics": s.curve.metrics} for row, s in zip(study.rows(), study.settings)]
    return {"pair": name, "endpoints": [read_record(a_dir), read_record(b_dir)], "rows": rows, "seconds": time.perf_counter() - start,
            "plot": f"fusion_quality_{name}.png", "load": os.getloadavg(), "learn_seconds": learn_seconds, "learn_steps": learn_steps,
            "points": points}


def merge_rows(stored: dict | None, fresh: dict) -> dict:
    """``fresh``'s rows replace the same settings' rows of the ``stored`` pair; the stored pair's other rows stay
    (a ``--settings`` run re-measures some rows without discarding the rest). Rows in :data:`SETTINGS` order."""
    if stored is None:
        return fresh
    by_setting = {r["setting"]: r for r in stored["rows"]} | {r["setting"]: r for r in fresh["rows"]}
    order = [s for s, _ in SETTINGS]
    rows = sorted(by_setting.values(), key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order))
    return {**fresh, "rows": rows}


def plot_pair(pair: dict, name: str) -> None:
    """The pair's loss curves, one per stored row that kept its curve (rows from before curves were stored have none)."""
    curves = [Curve(r["setting"], r["ts"], r["metrics"]) for r in pair["rows"] if "ts" in r]
    plot_curves(curves, RESULTS / pair["plot"], title=f"{name}: seed 0 vs seed 1")


def barrier_cut(row: dict, vanilla: dict | None) -> str:
    """How much of vanilla averaging's barrier an alignment removes: 1 − barrier / barrier(none)."""
    if vanilla is None or vanilla["barrier"] <= 0:
        return "–"
    return f"{1 - row['barrier'] / vanilla['barrier']:.0%}"


def ordered_pairs(done: dict[str, dict]) -> list[dict]:
    """The stored pairs in report order: the known ones first, then any other in the order they were added."""
    return [done[n] for n in PAIRS if n in done] + [p for n, p in done.items() if n not in PAIRS]


def kway(k_values: list[int]) -> list[dict]:
    """K digits ViTs aligned to a common basis — a star to model 0, or iteratively (each to the mean of the others,
    :func:`symmerge.alignment.align_many`) — then averaged; accuracy of the merge vs the models' mean accuracy."""
    dirs = [build("vit-digits", s) for s in range(max(k_values))]
    ckpts = [open_checkpoint(d) for d in dirs]
    states = [load_state_dict(c) for c in ckpts]
    evaluate = make_evaluator("zoo", dirs[0])
    rows = []
    for k in k_values:
        individual = [read_record(d)["test_accuracy"] for d in dirs[:k]]
        for setting in ("none", "all", "all iterative", "all,residual", "all,residual iterative"):
            symmetries = setting.split()[0]
            start = time.perf_counter()
            extra = {}
            if symmetries == "none":
                aligned = states[:k]
            else:
                many = symmerge.align_many(states[:k], config=ckpts[0].config, symmetries=symmetries,
                                           rounds=5 if setting.endswith("iterative") else 0)
                aligned = many.states
                extra = {"spread_star": many.spread_history[0], "spread_final": many.spread_history[-1], "rounds": many.rounds}
            seconds = time.perf_counter() - start
            merged = {key: sum(st[key].float() for st in aligned) / k for key in aligned[0]}
            model = model_for(ckpts[0].config, merged, untied="residual" in symmetries)
            load_weights(model, merged)
            scores = evaluate(model)
            rows.append({"k": k, "setting": setting, "merged_accuracy": scores["accuracy"], "merged_loss": scores["loss"],
                         "mean_individual_accuracy": sum(individual) / k, "seconds": seconds, **extra})
    return rows


def smollm2_row(symmetries: str = "all,residual", windows: int = 16, context: int = 128) -> dict:
    """Real LLaMA weights: SmolLM2-135M and a function-preserving scrambled copy, averaged naively and after
    alignment; perplexity on Shakespeare (tokenised with SmolLM2's tokenizer)."""
    import math

    from transformers import AutoTokenizer

    from symmerge.assets import smollm2_dir
    from symmerge.zoo.data import shakespeare_files
    from symmerge.zoo.evaluate import evaluate_lm

    path = smollm2_dir()
    ckpt = open_checkpoint(path)
    original = load_state_dict(ckpt)
    text = shakespeare_files()[0].read_text(errors="replace")[:60_000]
    tokens = torch.tensor(AutoTokenizer.from_pretrained(path)(text)["input_ids"])
    scrambled = symmerge.apply_random_symmetry(original, config=ckpt.config, symmetries=symmetries, seed=0)
    start = time.perf_counter()
    result = symmerge.align(original, scrambled, config=ckpt.config, symmetries=symmetries)
    seconds = time.perf_counter() - start
    partner = result.merge_partner or with_untied_head(original, result.spec.residual)
    model = model_for(ckpt.config, partner, untied=True)

    def ppl(state) -> float:
        load_weights(model, state)
        return math.exp(evaluate_lm(model, tokens, context, windows=windows)["loss"])

    average = lambda x, y: {k: (x[k].float() + y[k].float()) / 2 for k in x}  # noqa: E731
    return {"symmetries": symmetries, "tokens": len(tokens), "windows": windows, "context": context, "align_seconds": seconds,
            "ppl_original": ppl(partner), "ppl_scrambled": ppl(scrambled), "ppl_naive_average": ppl(average(partner, scrambled)),
            "ppl_aligned_average": ppl(average(partner, result.state_dict)), "relative_distance_after": result.report.relative_after}


def markdown(pairs: list[dict], kway_rows: list[dict], machine: dict, smollm2: dict | None = None) -> str:
    out = ["# Fusion quality on the zoo", "",
           f"Machine: {machine['cpus']} CPUs, load average at start {machine['load'][0]:.2f}; torch {torch.__version__}. "
           "Barrier = max_t [L(θ(t)) − ((1−t) L(A) + t L(B))] over the given t; distance = ‖A − B'‖ after alignment "
           "(residual settings: B' unfolded with A's norm gains, in A's own parametrisation). Calibration (act:, learn:) uses the training split; "
           "every score is on the held-out split.", ""]
    if pairs:
        out += ["## Summary: barrier (nats) / midpoint accuracy / align seconds per pair", "",
                "| alignment | " + " | ".join(p["pair"] for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
        for i, (setting, what) in enumerate(SETTINGS):
            cells = []
            for p in pairs:
                row = next((r for r in p["rows"] if r["setting"] == setting), None)
                if row is None:
                    cells.append("–")
                    continue
                acc = f" / {row['midpoint_accuracy']:.1%}" if "midpoint_accuracy" in row else ""
                cells.append(f"{row['barrier']:.3f}{acc} / {row['align_seconds']:.0f} s")
            out.append(f"| `{setting}` ({what}) | " + " | ".join(cells) + " |")
        out += ["", "Load average while each pair ran (1/5/15 min, at its end): " +
                "; ".join(f"{p['pair']} {p.get('load', ['?'])[0]:.1f}" if isinstance(p.get('load', [None])[0], float) else p['pair'] for p in pairs) +
                f". Learned matching budget: {pairs[0].get('learn_seconds')} s per pair; calibration: 2048 training examples "
                "(batches of 64; every 4th batch held out for its objective).", "",
                "**GLMC's published rows (theirs, not ours: Theus et al. 2025, Table 2; their models, data and compute) — barrier "
                "vanilla → data-free weight matching → learned:**", "", "| their pair | vanilla | weight matching | learned |", "|---|---|---|---|"]
        out += [f"| {k} (theirs) | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} |" for k, v in GLMC.items()]
        out.append("")
    for p in pairs:
        e = p["endpoints"]
        scores = " / ".join(f"{r.get('test_accuracy', r.get('val_loss')):.4g}" for r in e)
        score_kind = 'accuracy' if 'test_accuracy' in e[0] and e[0]['test_accuracy'] is not None else 'val loss'
        out += [f"## {p['pair']} (seed 0 vs seed 1; endpoint {score_kind}: {scores}; {p.get('points', 11)} points on the path; {p['seconds']:.0f} s, "
                f"load {p['load'][0]:.1f} at its end)", "",
                "| alignment | what | distance | Δ distance | midpoint loss | barrier | barrier cut vs vanilla | midpoint acc | align s |",
                "|---|---|---|---|---|---|---|---|---|"]
        vanilla = next((r for r in p["rows"] if r["setting"] == "none"), None)
        for row in p["rows"]:
            acc = f"{row['midpoint_accuracy']:.2%}" if "midpoint_accuracy" in row else "–"
            change = f"{(row['distance'] - vanilla['distance']) / vanilla['distance']:+.1%}" if vanilla else "–"
            out.append(f"| `{row['setting']}` | {WHAT.get(row['setting'], '')} | {row['distance']:.4g} | {change} | {row['midpoint_loss']:.4f} | "
                       f"{row['barrier']:.4f} | {barrier_cut(row, vanilla)} | {acc} | {row['align_seconds']:.1f} |")
        latest = max((r.get("measured", "") for r in p["rows"]), default="")
        older = [f"`{r['setting']}` {r.get('measured', 'before rows recorded it')}" for r in p["rows"] if r.get("measured", "") != latest]
        if older:
            out += ["", f"Rows measured in an earlier run than the rest ({latest}): " + "; ".join(older) + "."]
        out += ["", f"![{p['pair']}]({p['plot']})", ""]
    if kway_rows:
        out += ["## K-model merge (digits ViTs: star to model 0 vs iterative `align_many`, data-free, plain mean)", "",
                "| K | alignment | merged accuracy | merged loss | mean individual accuracy | spread Σ‖θ_i − θ̄‖² star → final | rounds | s |",
                "|---|---|---|---|---|---|---|---|"]
        for r in kway_rows:
            spread = f"{r['spread_star']:.1f} → {r['spread_final']:.1f}" if "spread_star" in r else "–"
            out.append(f"| {r['k']} | `{r['setting']}` | {r['merged_accuracy']:.2%} | {r['merged_loss']:.4f} | {r['mean_individual_accuracy']:.2%} | "
                       f"{spread} | {r.get('rounds', '–')} | {r.get('seconds', 0):.1f} |")
        out.append("")
    if smollm2:
        r = smollm2
        out += ["## SmolLM2-135M: rotate-then-merge (real weights, no training)", "",
                f"A copy scrambled by `{r['symmetries']}` computes the same function; perplexity on {r['windows']} windows of {r['context']} "
                f"Shakespeare tokens ({r['tokens']} tokens of text). Alignment took {r['align_seconds']:.0f} s and returns relative distance "
                f"{r['relative_distance_after']:.1e}.", "",
                "| model | perplexity |", "|---|---|",
                f"| original | {r['ppl_original']:.2f} |", f"| scrambled copy | {r['ppl_scrambled']:.2f} |",
                f"| naive average of original and copy | {r['ppl_naive_average']:.2f} |",
                f"| average after `symmerge.align` | {r['ppl_aligned_average']:.2f} |", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["vit-digits", "vit-fmnist", "gpt2-shakespeare"])
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--learn-steps", type=int, default=100_000)
    parser.add_argument("--learn-seconds", type=float, default=150.0)
    parser.add_argument("--kway", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--settings", nargs="+", default=[s for s, _ in SETTINGS], choices=[s for s, _ in SETTINGS], metavar="SETTING",
                        help="the alignment rows to run (default: all)")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    previous = json.loads((RESULTS / "fusion_quality.json").read_text()) if (RESULTS / "fusion_quality.json").exists() else {}
    done = {p["pair"]: p for p in previous.get("pairs", [])}  # pairs not asked for this time are kept
    for name in args.pairs:
        done[name] = merge_rows(done.get(name), pair_study(name, args.points, args.learn_steps, args.learn_seconds, args.settings))
        plot_pair(done[name], name)
        print(f"{name}: done in {done[name]['seconds']:.0f} s", flush=True)
    pairs = ordered_pairs(done)
    kway_rows = kway(args.kway) if args.kway else previous.get("kway", [])
    smollm2 = smollm2_row() if args.smollm2 else previous.get("smollm2")
    text = markdown(pairs, kway_rows, machine, smollm2)
    (RESULTS / "fusion_quality.md").write_text(text)
    (RESULTS / "fusion_quality.json").write_text(json.dumps({"machine": machine, "pairs": pairs, "kway": kway_rows, "smollm2": smollm2},
                                                            indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
