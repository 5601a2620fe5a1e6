"""Which exact linear-assignment solver symmerge uses: timed on FFN-matching problems at n = 1536 ... 8192.

Similarity matrices are built like the real ones, ``C = W_in,A W_in,Bᵀ + b_A b_Bᵀ + W_out,Aᵀ W_out,B`` (torch
float32, seeded) with d_model = n/4, for two weakly related models: B = ρ·P(A) + sqrt(1 − ρ²)·noise with
ρ = 3/sqrt(2d+1), so the optimum recovers only a minority of the planted pairs, as for independently trained models.

Solvers (all maximise C; the lap-family ones minimise ``-C`` cast to float32):
scipy ``linear_sum_assignment`` on float64 and float32, and lapx's ``lapjvh``, ``lapjvr``, ``lapjvs``, ``lapjvc``,
``lapjvx``. Each is wrapped in an adapter returning ``col_for_row`` (numpy int64). Every answer is checked to be a
permutation reaching scipy-float64's optimum (relative gap ≤ 1e-9); a solver that fails is flagged and never ranked.

Timing: CPU seconds (``time.process_time``, all threads of this process; the primary metric on a shared machine)
and wall seconds, median of up to ``--reps`` repetitions. Repetitions are interleaved across solvers (rep 1 of
every solver, then rep 2, ...) so that load changes hit all solvers alike; a further repetition of a case is
skipped once it would exceed ``--budget`` seconds for that case, or the global ``--deadline``.

Finally the winner at n=3072 (or the first size) solves 12 independent LAPs sequentially and through
``ThreadPoolExecutor(2)``, to see whether it releases the GIL.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lap_solvers.py [--sizes 1536 3072 4096 8192] [--reps 3]

Writes ``benchmarks/results/lap_solvers.{json,md}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not burn CPU seconds

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import lap  # noqa: E402  (the ``lapx`` distribution)
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOL = 1e-9


# --------------------------------------------------------------------------- problems

def similarity(n: int, seed: int = 0, return_perm: bool = False):
    """FFN neuron similarity C (n × n, float32) for two weakly related models with d_ff = n, d_model = n/4.

    Neuron i of B is a noisy copy of neuron ``perm[i]`` of A, i.e. the planted match is row perm[i] -> column i.
    """
    g = torch.Generator().manual_seed(seed)
    d = n // 4
    rho = 3 / math.sqrt(2 * d + 1)
    mix = math.sqrt(1 - rho**2)
    w_in_a = torch.randn(n, d, generator=g)       # Linear(d -> n).weight
    b_a = torch.randn(n, generator=g)
    w_out_a = torch.randn(d, n, generator=g)      # Linear(n -> d).weight
    perm = torch.randperm(n, generator=g)
    w_in_b = rho * w_in_a[perm] + mix * torch.randn(n, d, generator=g)
    b_b = rho * b_a[perm] + mix * torch.randn(n, generator=g)
    w_out_b = rho * w_out_a[:, perm] + mix * torch.randn(d, n, generator=g)
    c = w_in_a @ w_in_b.T + torch.outer(b_a, b_b) + w_out_a.T @ w_out_b
    c = np.ascontiguousarray(c.numpy(), dtype=np.float32)
    return (c, perm.numpy()) if return_perm else c


# --------------------------------------------------------------------------- adapters: C (maximise) -> col_for_row

def _scatter(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    col_for_row = np.full(n, -1, dtype=np.int64)
    col_for_row[np.asarray(rows, dtype=np.int64)] = cols
    return col_for_row


def scipy_f64(c: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(np.asarray(c, dtype=np.float64), maximize=True)
    return _scatter(len(c), rows, cols)


def scipy_f32(c: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(np.asarray(c, dtype=np.float32), maximize=True)
    return _scatter(len(c), rows, cols)


def _neg32(c: np.ndarray) -> np.ndarray:
    return np.negative(c, dtype=np.float32)  # exact: negation of float32 values; lap-family solvers minimise


def lapjvh(c: np.ndarray) -> np.ndarray:
    # lapjvh(cost, extend_cost=False, cost_limit=inf, return_cost=True) -> [cost,] rows, cols (aligned, rows sorted)
    rows, cols = lap.lapjvh(_neg32(c), return_cost=False)
    return _scatter(len(c), rows, cols)


def lapjvr(c: np.ndarray) -> np.ndarray:
    # same contract as lapjvh
    rows, cols = lap.lapjvr(_neg32(c), return_cost=False)
    return _scatter(len(c), rows, cols)


def lapjvs(c: np.ndarray) -> np.ndarray:
    # lapjvs(cost, extend_cost=None, return_cost=True, jvx_like=True, prefer_float32=True)
    # jvx_like=True -> [cost,] rows, cols (aligned); jvx_like=False would give mappings x, y instead
    rows, cols = lap.lapjvs(_neg32(c), return_cost=False, jvx_like=True)
    return _scatter(len(c), rows, cols)


def lapjvc(c: np.ndarray) -> np.ndarray:
    # lapjvc(cost, return_cost=True) -> [cost,] row_indices, col_indices (int32, aligned)
    rows, cols = lap.lapjvc(_neg32(c), return_cost=False)
    return _scatter(len(c), rows, cols)


def lapjvx(c: np.ndarray) -> np.ndarray:
    # lapjvx(cost, extend_cost=False, cost_limit=inf, return_cost=True) -> [cost,] row_indices, col_indices
    rows, cols = lap.lapjvx(_neg32(c), return_cost=False)
    return _scatter(len(c), rows, cols)


SOLVERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scipy f64": scipy_f64,
    "scipy f32": scipy_f32,
    "lapx lapjvh f32": lapjvh,
    "lapx lapjvr f32": lapjvr,
    "lapx lapjvs f32": lapjvs,
    "lapx lapjvc f32": lapjvc,
    "lapx lapjvx f32": lapjvx,
}
REFERENCE = "scipy f64"


def objective(c: np.ndarray, col_for_row: np.ndarray) -> float:
    return float(c[np.arange(len(c)), col_for_row].astype(np.float64).sum())


def check(c: np.ndarray, col_for_row: np.ndarray, best: float) -> dict:
    n = len(c)
    ok_perm = (col_for_row.shape == (n,) and col_for_row.min() >= 0 and col_for_row.max() < n
               and len(np.unique(col_for_row)) == n)
    if not ok_perm:
        return {"valid_permutation": False, "relative_gap": None, "exact": False}
    gap = (best - objective(c, col_for_row)) / abs(best)
    return {"valid_permutation": True, "relative_gap": gap, "exact": abs(gap) <= TOL}


def timed(fn: Callable, *a):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*a)
    return out, time.process_time() - c0, time.perf_counter() - w0


# --------------------------------------------------------------------------- benchmark

def run_size(n: int, names: list[str], reps: int, budget: float, deadline: float) -> dict:
    (c, perm), build_cpu, build_wall = timed(similarity, n, 0, True)
    print(f"n={n}: similarity built in {build_cpu:.2f} cpu s / {build_wall:.2f} wall s", flush=True)
    # untimed warm-up on a tiny problem (imports, first-call allocations); failures are recorded below
    warm_errors = {}
    for name in names:
        try:
            SOLVERS[name](similarity(64, seed=1))
        except Exception as exc:
            warm_errors[name] = f"{type(exc).__name__}: {exc}"

    ref_sol, ref_cpu, ref_wall = timed(SOLVERS[REFERENCE], c)
    best = objective(c, ref_sol)
    # difficulty indicator: share of the planted pairs the optimum recovers (a minority, as for independent models)
    planted = float(np.mean(ref_sol[perm] == np.arange(n)))
    print(f"  optimum {best:.6e}, recovers {planted:.1%} of the planted pairs", flush=True)

    rec: dict = {name: {"cpu": [], "wall": [], "error": warm_errors.get(name), "check": None} for name in names}
    if REFERENCE in rec:  # the reference solve doubles as its first timed repetition
        rec[REFERENCE]["cpu"].append(ref_cpu)
        rec[REFERENCE]["wall"].append(ref_wall)
        rec[REFERENCE]["check"] = check(c, ref_sol, best)
    for r in range(reps):
        for name in names:
            e = rec[name]
            if e["error"] is not None or len(e["cpu"]) > r:
                continue
            if e["wall"] and (sum(e["wall"]) + max(e["wall"]) > budget or time.perf_counter() + max(e["wall"]) > deadline):
                continue
            try:
                sol, cpu, wall = timed(SOLVERS[name], c)
            except Exception as exc:  # a crashing solver is flagged, not fatal
                e["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                continue
            e["cpu"].append(cpu)
            e["wall"].append(wall)
            res = check(c, sol, best)
            if e["check"] is None or not res["exact"]:
                e["check"] = res  # keep the first result, or any failing one
            del sol
    out = {"build_cpu_s": build_cpu, "build_wall_s": build_wall, "best_objective": best, "planted_recovered": planted, "solvers": {}}
    for name in names:
        e = rec[name]
        chk = e["check"] or {"valid_permutation": None, "relative_gap": None, "exact": False}
        row = {"cpu_s": statistics.median(e["cpu"]) if e["cpu"] else None,
               "wall_s": statistics.median(e["wall"]) if e["wall"] else None,
               "cpu_runs_s": e["cpu"], "wall_runs_s": e["wall"], "runs": len(e["cpu"]), "error": e["error"], **chk}
        out["solvers"][name] = row
        gap = "n/a" if row["relative_gap"] is None else f"{row['relative_gap']:+.1e}"
        status = "ok" if row["exact"] else ("ERROR " + e["error"] if e["error"] else "NOT EXACT")
        cpu = "-" if row["cpu_s"] is None else f"{row['cpu_s']:8.3f}"
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:8.3f}"
        print(f"  {name:<16} cpu {cpu} s  wall {wall} s  runs {row['runs']}  gap {gap}  {status}", flush=True)
    return out


def thread_test(name: str, n: int, count: int = 12) -> dict:
    solve = SOLVERS[name]
    mats = [similarity(n, seed) for seed in range(100, 100 + count)]
    solve(mats[0])  # warm-up
    seq, seq_cpu, seq_wall = timed(lambda: [solve(m) for m in mats])

    def pooled():
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(solve, mats))

    par, par_cpu, par_wall = timed(pooled)
    same = all(np.array_equal(a, b) for a, b in zip(seq, par))
    return {"solver": name, "n": n, "count": count, "sequential_wall_s": seq_wall, "sequential_cpu_s": seq_cpu,
            "two_threads_wall_s": par_wall, "two_threads_cpu_s": par_cpu, "wall_speedup": seq_wall / par_wall,
            "two_threads_cpu_per_wall": par_cpu / par_wall, "same_solutions": same, "gil_probe": gil_probe(solve, mats[0])}


def gil_probe(solve: Callable, c: np.ndarray) -> dict:
    """Direct GIL check, independent of free cores: while ``solve`` runs in a worker thread, the main thread spins a
    Python loop and records its longest stall. A solver holding the GIL stalls it for ~the whole solve; one that
    releases it leaves only scheduler-sized gaps (ms)."""
    import threading

    done = threading.Event()
    t = threading.Thread(target=lambda: (solve(c), done.set()))
    t0 = last = time.perf_counter()
    t.start()
    max_gap = iters = 0
    while not done.is_set():
        now = time.perf_counter()
        max_gap, last, iters = max(max_gap, now - last), now, iters + 1
    solve_wall = time.perf_counter() - t0
    t.join()
    return {"solve_wall_s": solve_wall, "main_thread_max_stall_s": max_gap, "main_thread_iterations": iters,
            "releases_gil": max_gap < 0.5 * solve_wall}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(results: dict, sizes: list[int], names: list[str]) -> str:
    def cell(n, name):
        r = results["cases"][str(n)]["solvers"][name]
        if r["cpu_s"] is None:
            return "**ERROR**"
        s = f"{r['cpu_s']:.3f} / {r['wall_s']:.3f}"
        if not r["exact"]:
            s += " **NOT EXACT**" if r["valid_permutation"] else " **INVALID**"
        return s

    lines = ["| solver | " + " | ".join(f"n={n}" for n in sizes) + " | max rel. gap |",
             "|---|" + "---:|" * len(sizes) + "---:|"]
    for name in names:
        gaps = [results["cases"][str(n)]["solvers"][name]["relative_gap"] for n in sizes]
        g = "n/a" if any(x is None for x in gaps) else f"{max(abs(x) for x in gaps):.1e}"
        lines.append(f"| {name} | " + " | ".join(cell(n, name) for n in sizes) + f" | {g} |")
    w = results["winner_per_n"]
    lines += ["", "Winner per n (lowest median CPU s among exact solvers): "
              + ", ".join(f"n={n}: **{w[str(n)]}**" for n in sizes) + ".",
              f"Overall winner (lowest summed CPU s, exact at every n): **{results['winner']}**."]
    t = results.get("threads")
    if t:
        lines.append(f"{t['count']} independent LAPs at n={t['n']} with {t['solver']}: sequential "
                     f"{t['sequential_wall_s']:.2f} s wall ({t['sequential_cpu_s']:.2f} cpu s), ThreadPoolExecutor(2) "
                     f"{t['two_threads_wall_s']:.2f} s wall ({t['two_threads_cpu_s']:.2f} cpu s): wall speed-up "
                     f"×{t['wall_speedup']:.2f}, identical solutions: {t['same_solutions']}.")
        p = t["gil_probe"]
        lines.append(f"GIL probe: during one {p['solve_wall_s']:.2f} s solve in a worker thread the main thread's longest "
                     f"stall was {p['main_thread_max_stall_s'] * 1e3:.1f} ms ({p['main_thread_iterations']} loop "
                     f"iterations) → releases the GIL: {p['releases_gil']}.")
    m = results["machine"]
    head = (f"LAP solvers on FFN similarity matrices (C = W_in,A W_in,Bᵀ + b_A b_Bᵀ + W_out,Aᵀ W_out,B, d = n/4, "
            f"ρ = 3/√(2d+1)). Cells: CPU s / wall s, median of up to {results['args']['reps']} runs. "
            f"{m['cpus']} CPUs ({m['cpu_model']}, {m['platform']}), load average {m['load_before'][0]:.2f} before / {m['load_after'][0]:.2f} after, "
            f"OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}; scipy {m['scipy']}, lapx {m['lapx']}, numpy {m['numpy']}.\n")
    return head + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1536, 3072, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=25.0, help="wall seconds per (solver, n) case")
    parser.add_argument("--deadline", type=float, default=300.0, help="no extra repetitions after this many s")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--thread-n", type=int, default=3072)
    parser.add_argument("--no-threads", action="store_true", help="skip the ThreadPoolExecutor test")
    args = parser.parse_args()
    names = args.solvers
    start = time.perf_counter()
    deadline = start + args.deadline

    results: dict = {
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(), "load_before": os.getloadavg(),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
                    "scipy": scipy.__version__, "lapx": version("lapx"), "numpy": np.__version__,
                    "torch": torch.__version__},
        "tolerance": TOL,
        "cases": {},
    }
    for n in args.sizes:
        results["cases"][str(n)] = run_size(n, names, args.reps, args.budget, deadline)

    winner_per_n = {}
    for n in args.sizes:
        exact = {k: v for k, v in results["cases"][str(n)]["solvers"].items() if v["exact"] and v["cpu_s"] is not None}
        winner_per_n[str(n)] = min(exact, key=lambda k: exact[k]["cpu_s"]) if exact else None
    always_exact = [k for k in names if all(results["cases"][str(n)]["solvers"][k]["exact"] for n in args.sizes)]
    results["winner_per_n"] = winner_per_n
    results["winner"] = (min(always_exact, key=lambda k: sum(results["cases"][str(n)]["solvers"][k]["cpu_s"]
                                                             for n in args.sizes)) if always_exact else None)
    results["flagged"] = sorted(set(names) - set(always_exact))

    if not args.no_threads and results["winner"]:
        t_n = args.thread_n
        print(f"thread test: 12 LAPs at n={t_n} with {results['winner']} ...", flush=True)
        results["threads"] = thread_test(results["winner"], t_n)
        print(f"  {results['threads']}", flush=True)

    results["machine"]["load_after"] = os.getloadavg()
    results["total_wall_s"] = time.perf_counter() - start
    md = markdown(results, args.sizes, names)
    print("\n" + md)  # what benchmarks/results/lap_solvers.md records
    print(f"total wall {results['total_wall_s']:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lap_solvers.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "lap_solvers.md").write_text(md)


if __name__ == "__main__":
    main()
