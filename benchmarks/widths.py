"""Merging models of different widths: a wide vit-digits (FFN width 128) with a narrow one (vit-digits-narrow, FFN
width 64, trained from another seed), with and without alignment, under both rules for the wide model's neurons the
narrow one lacks (docs/DESIGN.md §3, ``unmatched``).

For each pair (wide seed s, narrow seed 1 − s) and setting, the narrow model B is embedded into the wide shape —
``none``: the identity semi-permutation (neuron i to slot i); ``ffn`` / ``all``: weight matching (rectangular FFN
assignment; ``all`` adds per-head rotations, scales and head permutations); ``all,residual``: plus the residual map
(the narrow model grown by the identity embedding, then aligned as a same-shape model) — and the path
``θ(t) = (1 − t)·θ_A + t·θ_B'`` is evaluated at 11 points on the held-out split. ``zero``: B' is the embedding (zero
neurons in the empty slots: averaging scales both sides of A's unmatched neurons by 1 − t); ``inputs``: B' takes
A's input side (W_in rows, biases) in its empty slots and keeps a zero output side, so A's unmatched neurons keep
their activations and their output is scaled by 1 − t — as in the ensemble (1 − t) f_A + t f_B; ``mean``: B' takes
A's whole neurons there (the per-slot mean over the models that have the slot), so they stay unchanged along the
path. The barrier is ``max_t L(θ(t)) − ((1 − t) L_A + t L_B)`` against the endpoints' own losses (B: the
narrow model; under ``mean`` the point t = 1 is B plus A's unmatched neurons, so the barrier there can be > 0). The
midpoint (t = ½) is what ``symmerge merge WIDE NARROW --method linear`` writes: checked here against the merge itself.
A same-width pair (vit-digits seeds 0 and 1) is the reference. Writes ``benchmarks/results/widths.md``.

    python benchmarks/widths.py [--points 11]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import symmerge  # noqa: E402
from symmerge.evaluate import interpolation_curve, make_evaluator, model_for  # noqa: E402
from symmerge.groups import apply_transform, embedding_transform, fill_empty_slots  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.merge.engine import run_merge  # noqa: E402
from symmerge.merge.planner import plan_merge  # noqa: E402
from symmerge.merge.recipe import recipe_from_models  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402
from symmerge.zoo import build  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def filled(a: dict, b: dict, spec, transform, rule: str) -> dict:
    """``b`` with the slots ``transform`` leaves empty filled from ``a`` by ``rule`` (what the merge does for two models)."""
    states = [dict(a), dict(b)]
    for group in spec.groups():
        fill_empty_slots(states, group, [None, transform], rule=rule)
    return states[1]


def merged_by_engine(wide_dir: Path, narrow_dir: Path, align: str, unmatched: str) -> dict:
    """What ``symmerge merge WIDE NARROW --method linear`` writes (the engine, streaming)."""
    recipe = recipe_from_models([str(wide_dir), str(narrow_dir)], "linear", align=align, unmatched=unmatched)
    with tempfile.TemporaryDirectory() as tmp:
        run_merge(plan_merge(recipe), Path(tmp) / "out", progress=False)
        return load_file(Path(tmp) / "out" / "model.safetensors")


SETTINGS = ("none", "ffn", "all", "all,residual")


def study(wide_dir: Path, narrow_dir: Path, ts: list[float]) -> list[dict]:
    ca, cb = open_checkpoint(wide_dir), open_checkpoint(narrow_dir)
    a, b = load_state_dict(ca), load_state_dict(cb)
    spec, own = spec_for(ca.config, a.keys()), spec_for(cb.config, b.keys())
    evaluate = make_evaluator("zoo", wide_dir)
    model = model_for(ca.config, a, False)
    loss_b = evaluate(model_for(cb.config, b, False))["loss"]
    rows = []
    for align in SETTINGS:
        start = time.perf_counter()
        if align == "none":
            transform = embedding_transform(spec, own)
            embedded = apply_transform(b, spec, transform)
        else:
            result = symmerge.align(a, b, spec=spec, model_spec=own, symmetries=align)
            assert not result.folded
            transform, embedded = result.transform, result.state_dict
        secs = time.perf_counter() - start
        for rule in ("zero", "inputs", "mean"):
            b_path = filled(a, embedded, spec, transform, rule)
            curve = interpolation_curve(model, a, b_path, evaluate, ts)
            l_a = curve.losses[0]
            barrier = max(loss - ((1 - t) * l_a + t * loss_b) for t, loss in zip(curve.ts, curve.losses))
            engine = merged_by_engine(wide_dir, narrow_dir, align, rule) if align != "none" else None
            mid = {k: torch.lerp(v.float(), b_path[k].float(), 0.5) for k, v in a.items() if v.is_floating_point()}
            check = max(float((engine[k].float() - v).abs().max()) for k, v in mid.items() if k in engine) if engine else None
            rows.append({"alignment": align, "unmatched": rule, "loss_A": l_a, "loss_B": loss_b, "loss_t1": curve.losses[-1],
                         "midpoint_loss": curve.at(0.5)["loss"], "midpoint_accuracy": curve.at(0.5)["accuracy"],
                         "accuracy_A": curve.metrics[0]["accuracy"], "barrier": barrier,
                         "distance": symmerge.state_distance(a, embedded), "seconds": secs, "engine_max_diff": check})
            print(f"  {align:<5} {rule:<5} barrier {barrier:.4f}  midpoint loss {rows[-1]['midpoint_loss']:.4f} "
                  f"acc {rows[-1]['midpoint_accuracy']:.2%}" + (f"  (engine diff {check:.1e})" if check is not None else ""), flush=True)
    return rows


def same_width(ts: list[float]) -> list[dict]:
    a_dir, b_dir = build("vit-digits", 0, progress=False), build("vit-digits", 1, progress=False)
    ca = open_checkpoint(a_dir)
    a, b = load_state_dict(ca), load_state_dict(open_checkpoint(b_dir))
    evaluate = make_evaluator("zoo", a_dir)
    model = model_for(ca.config, a, False)
    rows = []
    for align in SETTINGS:
        b2 = b if align == "none" else symmerge.align(a, b, config=ca.config, symmetries=align).state_dict
        curve = interpolation_curve(model, a, b2, evaluate, ts)
        rows.append({"alignment": align, "unmatched": "-", "loss_A": curve.losses[0], "loss_B": curve.losses[-1], "loss_t1": curve.losses[-1],
                     "midpoint_loss": curve.at(0.5)["loss"], "midpoint_accuracy": curve.at(0.5)["accuracy"],
                     "accuracy_A": curve.metrics[0]["accuracy"], "barrier": curve.barrier(), "distance": symmerge.state_distance(a, b2),
                     "seconds": 0.0, "engine_max_diff": None})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| alignment | unmatched | distance | loss A | loss B | loss at t=1 | midpoint loss | midpoint acc | barrier | engine = API |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = "-" if r["engine_max_diff"] is None else f"{r['engine_max_diff']:.1e}"
        lines.append(f"| {r['alignment']} | {r['unmatched']} | {r['distance']:.2f} | {r['loss_A']:.4f} | {r['loss_B']:.4f} | {r['loss_t1']:.4f} | "
                     f"{r['midpoint_loss']:.4f} | {r['midpoint_accuracy']:.2%} | {r['barrier']:.4f} | {check} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    ts = [i / (args.points - 1) for i in range(args.points)]
    load_start = os.getloadavg()
    sections = []
    for wide_seed, narrow_seed in ((0, 1), (1, 0)):
        wide, narrow = build("vit-digits", wide_seed, progress=False), build("vit-digits-narrow", narrow_seed, progress=False)
        print(f"vit-digits seed {wide_seed} (FFN 128) + vit-digits-narrow seed {narrow_seed} (FFN 64)", flush=True)
        sections.append((f"vit-digits seed {wide_seed} (FFN 128) + vit-digits-narrow seed {narrow_seed} (FFN 64)", study(wide, narrow, ts)))
    print("same width: vit-digits seeds 0 and 1", flush=True)
    sections.append(("same width, for reference: vit-digits seeds 0 and 1 (FFN 128 both)", same_width(ts)))
    load_end = os.getloadavg()
    out = ["# Merging models of different widths (`benchmarks/widths.py`)", "",
           f"Load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (2 shared CPU cores). {args.points} points on "
           "the held-out test split of the digits data. `zero`: the narrow model's empty slots are zero neurons (the "
           "midpoint halves both sides of the wide model's unmatched neurons); `inputs`: they take the wide model's "
           "input side (the midpoint keeps their activations and halves their output); `mean`: they take the wide "
           "model's neurons (kept unchanged by the average). Barrier against the endpoints' own losses (loss B = the narrow model). "
           "`engine = API`: max |difference| between `symmerge merge WIDE NARROW --method linear -s SETTING` and the "
           "midpoint computed here. Distance: ‖θ_A − θ_B'‖ of the embedded narrow model (zero slots).", ""]
    for title, rows in sections:
        out += [f"## {title}", "", *table(rows), ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "widths.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
