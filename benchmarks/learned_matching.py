"""Learned matching on the zoo pairs: the `learn:all,residual` rows of ``fusion_quality.py``, run alone, with how
the budget was spent (steps, the step whose element was returned, wall and CPU seconds, the load).

For each pair (seed 0 vs seed 1 of a zoo recipe) B is aligned to A by learned matching on 2048 training examples
(batches of 64, every 4th held out for the objective) under a wall-clock budget, and the linear path between A
and B' is evaluated on the held-out split at ``--points`` values of t (the same evaluation as ``fusion_quality.py``).
Wall seconds depend on the machine's load (recorded at start and end); CPU seconds of this process, and steps,
less so. Writes ``benchmarks/results/learned_matching.{md,json}``.

    python benchmarks/learned_matching.py [--pairs vit-digits vit-fmnist gpt2-shakespeare] [--learn-seconds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from merge_speed import git_commit  # noqa: E402  (the rows record the commit that measured them)

import symmerge  # noqa: E402
from symmerge.data import load_calibration  # noqa: E402
from symmerge.evaluate import make_evaluator, model_for  # noqa: E402
from symmerge.evaluate.interpolation import interpolation_curve  # noqa: E402
from symmerge.groups.residual import with_untied_head  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.zoo import build  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTING = "learn:all,residual"


def pair_row(name: str, points: int, learn_steps: int, learn_seconds: float) -> dict:
    a_dir, b_dir = build(name, 0), build(name, 1)
    ca, cb = open_checkpoint(a_dir), open_checkpoint(b_dir)
    a, b = load_state_dict(ca), load_state_dict(cb)
    evaluate = make_evaluator("zoo", a_dir)
    calibration = load_calibration("zoo", model_dir=a_dir, num_examples=2048, labels=True, batch_size=64)
    load_start, wall, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    result = symmerge.align(a, b, config=ca.config, symmetries="all,residual", match="learned", calibration=calibration,
                            learn_steps=learn_steps, learn_seconds=learn_seconds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_end = os.getloadavg()
    partner = result.merge_partner or with_untied_head(a, result.spec.residual)  # A in the aligned parametrisation
    ts = [i / (points - 1) for i in range(points)]
    curve = interpolation_curve(model_for(ca.config, partner, untied=True), partner, result.state_dict, evaluate, ts, label=SETTING)
    learned = result.report.matching["learned"]
    mid = curve.at(0.5)
    return {"pair": name, "setting": SETTING, "barrier": curve.barrier(), "midpoint_loss": mid["loss"],
            "midpoint_accuracy": mid.get("accuracy"), "loss_A": curve.losses[0], "loss_B": curve.losses[-1],
            "distance": result.report.distance_after, "align_seconds": wall, "align_cpu_seconds": cpu,
            "load_start": load_start, "load_end": load_end, "learn_seconds": learn_seconds, "steps": learned["steps"],
            "best_step": learned["best_step"], "objective_first": learned["objective_first"], "objective_best": learned["objective_best"],
            "threads": torch.get_num_threads(), "measured": f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} @{git_commit()}"}


def markdown(rows: list[dict]) -> str:
    out = ["# Learned matching on the zoo pairs", "",
           f"torch {torch.__version__}, {os.cpu_count()} CPUs shared with other jobs (load averages below). Setting "
           f"`{SETTING}`: weight matching, then learned matching (symmerge/match/learned.py) under the wall-clock budget given; "
           "calibration 2048 training examples (batches of 64, every 4th held out for the objective); barrier = "
           "max_t [L(θ(t)) − ((1−t) L(A) + t L(B))] over 11 t on the held-out split, as in fusion_quality.md.", "",
           "| pair | barrier | midpoint loss | midpoint acc | distance | budget s | align wall s | align CPU s | steps | best step | load start → end | measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['midpoint_accuracy']:.2%}" if r.get("midpoint_accuracy") is not None else "–"
        out.append(f"| {r['pair']} | {r['barrier']:.4f} | {r['midpoint_loss']:.4f} | {acc} | {r['distance']:.4g} | {r['learn_seconds']:.0f} | "
                   f"{r['align_seconds']:.0f} | {r['align_cpu_seconds']:.0f} | {r['steps']} | {r['best_step']} | "
                   f"{r['load_start'][0]:.1f} → {r['load_end'][0]:.1f} | {r.get('measured', '–')} |")
    out += ["", "Rows are measured when their pair is asked for (`--pairs`), each on the day, commit and load it was run, with the "
            "budget in its row; `benchmarks/results/fusion_quality.md` holds the 150 s rows of every pair. Target (issue 9): "
            "≤ 0.05 on every pair, GPT-2 in under 5 minutes. The rate experiments (steps to target for other rates and "
            "warm-ups) are in `learned_matching_sweep.md`."]
    return "\n".join(out + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["vit-digits", "vit-fmnist", "gpt2-shakespeare"])
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--learn-steps", type=int, default=100_000)
    parser.add_argument("--learn-seconds", type=float, default=300.0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where learned_matching.{md,json} go (rows of other pairs there are kept)")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "learned_matching.json"
    done = {r["pair"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}  # pairs not asked for are kept
    for name in args.pairs:
        done[name] = pair_row(name, args.points, args.learn_steps, args.learn_seconds)
        print(f"{name}: barrier {done[name]['barrier']:.4f} after {done[name]['steps']} steps", flush=True)
    rows = [done[n] for n in sorted(done)]
    path.write_text(json.dumps(rows, indent=2))
    (args.results / "learned_matching.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
