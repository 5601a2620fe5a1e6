"""The effect of bfloat16 similarity matrices on the chosen FFN permutation (vs float32), on real generated layers.

For FFN layers of two checkpoints (benchmarks/scale.py's 1B pair: independent, and fine-tune), ``S`` is computed in
float32 and rounded to bfloat16 (what a bf16 GEMM with bf16 output returns; accumulation in float32 as oneDNN does),
both are solved exactly (lapx lapjvh), and we report the fraction of neurons assigned differently and the objective
gap ``(⟨P32, S⟩ − ⟨P16, S⟩) / |⟨P32, S⟩ − tr S|`` measured on the float32 ``S`` (how much of the gain over the identity
the bf16 solution gives up). Also times a float32 and a bf16 GEMM of one layer on this CPU.

    python benchmarks/bf16_similarity.py [--size 1b] [--layers 0,7]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from scale import ROOT  # the checkpoints scale.py generates, where it keeps them

from symmerge.groups.ffn import FFNTensors
from symmerge.match.ffn import ffn_similarity
from symmerge.match.lap import solve_lap

RESULTS = Path(__file__).resolve().parent / "results"


def layer(path: Path, i: int) -> FFNTensors:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    get = lambda k: safe_open(path / index[k], "pt").get_tensor(k).float()  # noqa: E731
    p = f"model.layers.{i}.mlp."
    return FFNTensors([get(p + "gate_proj.weight"), get(p + "up_proj.weight")], [], [get(p + "down_proj.weight")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1b")
    parser.add_argument("--layers", default="0,7")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for pair in ("b", "ft"):
        for i in (int(x) for x in args.layers.split(",")):
            ref, model = layer(ROOT / args.size / "a", i), layer(ROOT / args.size / pair, i)
            s32 = ffn_similarity(ref, model)
            s16 = s32.bfloat16().float()
            p32, p16 = solve_lap(s32), solve_lap(s16)
            s = s32.double().numpy()
            n = len(p32)
            obj32, obj16, ident = s[np.arange(n), p32].sum(), s[np.arange(n), p16].sum(), np.trace(s)
            rows.append({"pair": "independent" if pair == "b" else "fine-tune", "layer": i, "d_ff": n,
                         "differently_assigned": float((p32 != p16).mean()),
                         "objective_gap_of_gain": float((obj32 - obj16) / max(abs(obj32 - ident), 1e-30)),
                         "objective_gap_relative": float((obj32 - obj16) / abs(obj32))})
            print(rows[-1], flush=True)
    a = torch.randn(4096, 2048)
    timing = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        start = time.perf_counter()
        x @ x.T
        timing[str(dtype)] = round(2 * 4096 * 4096 * 2048 / (time.perf_counter() - start) / 1e9, 1)
    result = {"rows": rows, "gflops": timing, "load": os.getloadavg()}
    print(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16_similarity.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
