"""bfloat16 vs float32 FFN similarity GEMMs: how much faster, and what the rounding does to the chosen permutation.

For bfloat16 checkpoints on a CPU that multiplies bfloat16 natively (Intel AMX / AVX512-BF16),
:func:`symmerge.match.device.similarity_dtype` computes the FFN similarity ``S`` with one bfloat16 GEMM: the same
exact products, accumulated in float32, each entry rounded once to bfloat16. This measures, per FFN layer of a
pair: the seconds of each path (torch's threads), the share of neurons the exact LAP assigns differently on the two
``S``, and the objective gap — ``Σ_i S[i, π(i)]`` on the float32 ``S`` lost by the bfloat16 path's ``π``, as a
share of what the float32 ``π`` gains over the identity (0 = the same optimum).

Pairs (each FFN read in bfloat16; ``a``/``b`` folders of ``benchmarks/scale.py generate``, or zoo pairs cast to
bfloat16): random LLaMA-7B-width layers (independent: near-ties everywhere, the hardest case for rounding), a
fine-tune-like pair (``a`` vs ``ft``), and independently *trained* zoo pairs, whose neurons do correspond.
For each zoo pair, also the midpoint barrier of its ``-s all`` merge with the element chosen either way.
Writes ``benchmarks/results/similarity_dtype.{md,json}`` (the md gains a dated section per run).

    python benchmarks/similarity_dtype.py [--scale DIR ...] [--zoo gpt2-shakespeare-w256 vit-fmnist-w256] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from symmerge.groups.ffn import FFNTensors, read_ffn  # noqa: E402
from symmerge.io import open_checkpoint  # noqa: E402
from symmerge.io.stream import LazyState  # noqa: E402
from symmerge.match.device import SIMILARITY_DTYPE_ENV, cpu_has_native_bfloat16  # noqa: E402
from symmerge.match.ffn import ffn_similarity  # noqa: E402
from symmerge.match.lap import solve_lap  # noqa: E402
from symmerge.spec import StateView, spec_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import git_commit  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def bf16(t: FFNTensors) -> FFNTensors:
    cast = lambda ws: [w.to(torch.bfloat16) for w in ws]  # noqa: E731
    return FFNTensors(cast(t.in_weights), cast(t.in_biases), cast(t.out_weights))


def similarity(ref: FFNTensors, model: FFNTensors, dtype: str) -> tuple[torch.Tensor, float]:
    os.environ[SIMILARITY_DTYPE_ENV] = dtype
    begin = time.perf_counter()
    s = ffn_similarity(ref, model)
    return s, time.perf_counter() - begin


def compare(ref: FFNTensors, model: FFNTensors) -> dict:
    s32, t32 = similarity(ref, model, "float32")
    s16, t16 = similarity(ref, model, "bfloat16")
    p32, p16 = (torch.from_numpy(solve_lap(s.clone())) for s in (s32, s16))
    n = s32.shape[0]
    rows = torch.arange(n)
    exact = s32.double()
    value = lambda p: float(exact[rows, p].sum())  # noqa: E731
    gain = value(p32) - float(exact.diagonal().sum())
    err = (s16.double() - exact).abs().max() / exact.abs().max()
    return {"width": n, "float32_s": round(t32, 3), "bfloat16_s": round(t16, 3), "speedup": round(t32 / t16, 2),
            "max_abs_error_rel_to_max": float(err), "differ": float((p32 != p16).float().mean()),
            "objective_gap": (value(p32) - value(p16)) / gain if gain > 0 else 0.0, "identity_kept": bool((p32 == rows).all())}


def layers_of(ref_dir: Path, model_dir: Path, layers: int, cast: bool):
    rc = open_checkpoint(ref_dir)
    spec = spec_for(rc.config, rc.shapes().keys())
    ref, mod = StateView(LazyState(rc)), StateView(LazyState(open_checkpoint(model_dir)))
    for group in spec.ffn[:layers]:
        a, b = read_ffn(ref, group), read_ffn(mod, group)
        yield group.name, (bf16(a) if cast else a), (bf16(b) if cast else b)


def barriers(pair: str) -> dict:
    """The midpoint barrier of the zoo pair merged with ``-s all`` (``match_weights``), its element chosen on the
    bfloat16-cast weights with either similarity dtype and applied to the float32 models (so only the choice
    differs); held-out split, t = 0, 0.5, 1."""
    from symmerge.evaluate import make_evaluator
    from symmerge.evaluate.interpolation import interpolation_curve
    from symmerge.groups import apply_transform, parse_symmetries
    from symmerge.io import load_state_dict
    from symmerge.io.hf import build_model
    from symmerge.match.weights import match_weights
    from symmerge.zoo import build

    a_dir, b_dir = build(pair, 0, progress=False), build(pair, 1, progress=False)
    ca = open_checkpoint(a_dir)
    a, b = load_state_dict(ca), load_state_dict(open_checkpoint(b_dir))
    spec = spec_for(ca.config, a.keys())
    cast = lambda st: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in st.items()}  # noqa: E731
    a16, b16 = cast(a), cast(b)
    evaluate, module = make_evaluator("zoo", a_dir), build_model(ca.config, a)
    out = {}
    for dtype in ("float32", "bfloat16"):
        os.environ[SIMILARITY_DTYPE_ENV] = dtype
        element = match_weights(a16, b16, spec, parse_symmetries("all")).transform
        losses = interpolation_curve(module, a, apply_transform(b, spec, element), evaluate, [0.0, 0.5, 1.0], label=dtype).losses
        out[dtype] = losses[1] - (losses[0] + losses[2]) / 2
    return out


def markdown(out: dict) -> str:
    lines = [f"## {out['date']}, commit {out['commit']}",
             "",
             f"CPU native bfloat16: {out['native_bfloat16']}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average {out['load'][0]:.2f} → {out['load'][1]:.2f}.",
             "",
             "| pair | layer | width | float32 s | bfloat16 s | speed-up | max error / max | neurons assigned differently | objective gap | identity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['pair']} | {r['layer']} | {r['width']} | {r['float32_s']} | {r['bfloat16_s']} | {r['speedup']}× | "
                     f"{r['max_abs_error_rel_to_max']:.1e} | {100 * r['differ']:.2f}% | {r['objective_gap']:.1e} | {r['identity_kept']} |")
    if out["barriers"]:
        lines += ["", "Midpoint barrier of the `-s all` merge, its element chosen with either similarity dtype (on the bfloat16-cast pair):", "",
                  "| pair | float32 similarity | bfloat16 similarity |", "|---|---|---|"]
        lines += [f"| {p} | {b['float32']:.4f} | {b['bfloat16']:.4f} |" for p, b in out["barriers"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=Path, nargs="*", default=[], help="scale.py pair folders (with a/, b/ and optionally ft/)")
    parser.add_argument("--zoo", nargs="*", default=["gpt2-shakespeare-w256", "vit-fmnist-w256"], help="zoo pairs, cast to bfloat16")
    parser.add_argument("--layers", type=int, default=2, help="FFN layers per pair")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    for folder in args.scale:
        for other in ("b", "ft"):
            if (folder / other).exists():
                for name, a, b in layers_of(folder / "a", folder / other, args.layers, cast=False):
                    rows.append({"pair": f"{folder.name} a–{other}", "layer": name, **compare(a, b)})
                    print(json.dumps(rows[-1]), flush=True)
    if args.zoo:
        from symmerge.zoo import build
        for pair in args.zoo:
            for name, a, b in layers_of(build(pair, 0, progress=False), build(pair, 1, progress=False), args.layers, cast=True):
                rows.append({"pair": f"{pair} (trained, cast to bf16)", "layer": name, **compare(a, b)})
                print(json.dumps(rows[-1]), flush=True)
    found = {pair: barriers(pair) for pair in args.zoo}
    out = {"barriers": found, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
           "native_bfloat16": cpu_has_native_bfloat16(), "load": [load0, os.getloadavg()[0]], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "similarity_dtype.json").write_text(json.dumps(out, indent=2))
    md = RESULTS / "similarity_dtype.md"
    head = md.read_text() if md.exists() else "# FFN similarity in bfloat16 vs float32 (`benchmarks/similarity_dtype.py`)\n\n"
    md.write_text(head.rstrip("\n") + "\n\n" + markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
