"""What fanning the per-layer fits out as Ray tasks costs on one machine, at BERT-base size.

Two independently initialised BERT-base-shaped checkpoints (``align_speed.make_pair``) are aligned with the
per-layer classes, single-process and as Ray tasks on a local Ray instance (``--num-cpus`` workers; Ray gives each worker one thread: run with OMP_NUM_THREADS=1 for
the same in the single process), and the
results are checked to be identical. Reported (seconds, wall): Ray start-up, the first Ray alignment (workers
start, import torch and symmerge), later ones (warm workers), and the single-process alignment. On one machine
with few cores Ray can only add overhead; it pays off when a cluster has more cores (or GPUs) than one machine.
Writes ``benchmarks/results/ray_overhead_cpus<N>.{json,md}``.

    python benchmarks/ray_overhead.py [--repeats 3] [--num-cpus 2] [--symmetries all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a loaded machine
sys.path.insert(0, str(Path(__file__).parent))

import ray  # noqa: E402
import torch  # noqa: E402
from align_speed import make_pair  # noqa: E402

import symmerge  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.match.distributed import RayExecutor  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--symmetries", default="all")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir, model_dir = make_pair("bert", Path(tmp))
        ckpt = open_checkpoint(ref_dir)
        ref, model = (load_state_dict(open_checkpoint(p), file_backed=True) for p in (ref_dir, model_dir))
        spec = spec_for(ckpt.config, ref.keys())
        options = dict(spec=spec, symmetries=args.symmetries)
        executor, start_up = timed(lambda: RayExecutor("local", num_cpus=args.num_cpus))
        first = timed(lambda: symmerge.align(ref, model, ray=executor, **options))  # workers start and import
        local_runs, ray_runs = [], [first]
        for _ in range(args.repeats):  # interleaved: each pair runs under about the same load of a shared machine
            local_runs.append(timed(lambda: symmerge.align(ref, model, **options)))
            ray_runs.append(timed(lambda: symmerge.align(ref, model, ray=executor, **options)))
        identical = all(torch.equal(local_runs[0][0].state_dict[k], r.state_dict[k]) for r, _ in ray_runs for k in ref)
        ray.shutdown()
    result = {
        "symmetries": args.symmetries, "num_cpus": args.num_cpus, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "ray": ray.__version__,
        "ray_start_up": start_up, "ray_first_align": ray_runs[0][1], "ray_warm_align": statistics.median(t for _, t in ray_runs[1:]),
        "single_process_align": statistics.median(t for _, t in local_runs), "identical": identical,
        "single_process_runs": [t for _, t in local_runs], "ray_runs": [t for _, t in ray_runs],
        "single_process_stages": local_runs[-1][0].report.seconds, "ray_stages": ray_runs[-1][0].report.seconds,
    }
    result["warm_overhead"] = statistics.median(r - t for (_, r), (_, t) in zip(ray_runs[1:], local_runs))  # per interleaved pair
    table = ("| Ray start-up | first Ray align | warm Ray align | single-process align | warm overhead | identical |\n"
             "|---|---|---|---|---|---|\n"
             f"| {start_up:.2f} | {result['ray_first_align']:.2f} | {result['ray_warm_align']:.2f} | {result['single_process_align']:.2f} | "
             f"{result['warm_overhead']:+.2f} | {identical} |")
    header = (f"BERT-base pair, symmetries {args.symmetries}, seconds (wall; medians of {args.repeats} interleaved "
              f"single-process / warm-Ray pairs; the overhead is the median of the per-pair differences). Local Ray {ray.__version__} with "
              f"{args.num_cpus} worker CPUs on a {os.cpu_count()}-CPU machine; load average {load_before[0]:.2f} before, "
              f"{result['load_average_after'][0]:.2f} after.\n")
    print(header)
    print(table)
    print("stages, single process:", {k: round(v, 2) for k, v in result["single_process_stages"].items()})
    print("stages, Ray:", {k: round(v, 2) for k, v in result["ray_stages"].items()})
    RESULTS.mkdir(exist_ok=True)
    stem = f"ray_overhead_cpus{args.num_cpus}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
