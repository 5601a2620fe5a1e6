"""symmerge merge vs mergekit: wall time and peak memory of linear and TIES merges of LLaMA-shaped checkpoints.

Three ~168M-parameter LLaMA checkpoints (hidden 1024, 8 layers, FFN 2816, vocab 32000, 16 heads, untied
embeddings, bf16 safetensors) are generated once and cached: a random ``base`` and two
"fine-tunes" ``a``/``b`` = base + Gaussian noise of 1% of each tensor's RMS. mergekit is installed into its own
virtualenv (torch pinned to the local CPU wheel), never into the project's. Each job is run by both tools as a
separate process under ``/usr/bin/time -v`` (or a psutil poller of the process tree's RSS when that is missing):

* linear, weights 0.5/0.5, bf16 out — ``symmerge merge A B --method linear --align none`` vs ``mergekit-yaml``
  ``merge_method: linear`` (``dtype: bfloat16``);
* TIES, base, density 0.2, lambda 1, bf16 out — ``symmerge merge A B --method ties --base BASE --align none``
  vs mergekit's ``ties`` (weights 1, density 0.2, ``normalize: true`` = disjoint mean), in two variants:
  ``dtype: bfloat16`` (mergekit computes in bf16, its usual setting) and ``dtype: float32`` + ``out_dtype:
  bfloat16`` (float32 math like symmerge, the closest semantic match).

Outputs are compared tensor by tensor in float32 (linear: expected bit-identical; TIES: the differing entries are
attributed to their causes — ties at the trim threshold, common in bf16 task vectors, which mergekit's ``argsort``
and symmerge's memory-order tie-break resolve differently; cancelling task vectors, where mergekit elects +; and
mergekit's bf16 arithmetic in the first variant; see :func:`ties_attribution`). Prints a table and writes
``benchmarks/results/merge_speed.{json,md}``.

    .venv/bin/python benchmarks/merge_speed.py [--repeats 3] [--slow-repeats 1] [--scale full|small] [--skip-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = REPO / ".cache"
MK_VENV = CACHE / "bench-mergekit-venv"
CKPTS = CACHE / "bench-merge-ckpts"
WORK = CACHE / "bench-merge-out"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on local disk; any other version downloads CUDA wheels
TIME = Path("/usr/bin/time")

SCALES = {  # LlamaConfig keyword arguments
    "full": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, vocab_size=32000, num_attention_heads=16,
                 num_key_value_heads=16),
    "small": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, vocab_size=8000, num_attention_heads=4,
                  num_key_value_heads=4),
}
NOISE = 0.01  # fine-tune = base + N(0, (NOISE · rms(tensor))²)
SLOW_S = 30.0  # a job whose first run takes longer than this gets --slow-repeats runs in all
CKPT_VERSION = 1  # bump when the generation recipe changes (invalidates the cache)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("VIRTUAL_ENV", None)
    return env


# ------------------------------------------------------------------------------------------ mergekit venv


def ensure_mergekit() -> dict[str, str]:
    """Create the mergekit virtualenv if missing; return the versions found in it."""
    py, pip = MK_VENV / "bin" / "python", MK_VENV / "bin" / "pip"
    if not (MK_VENV / "bin" / "mergekit-yaml").exists():
        log(f"creating {MK_VENV} (torch first, then mergekit constrained to {TORCH_PIN})")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable if shutil.which("python3") is None else "python3", "-m", "venv", str(MK_VENV)], check=True)
        subprocess.run([str(pip), "install", "-q", TORCH_PIN], check=True)
        constraints = CACHE / "bench-mergekit-constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        subprocess.run([str(pip), "install", "-q", "mergekit", "-c", str(constraints)], check=True)
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m, json; "
         "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"],
        check=True, capture_output=True, text=True, env=child_env(),
    )
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    if not versions["torch"].startswith(TORCH_PIN.split("==")[1]):
        raise SystemExit(f"{MK_VENV}: torch {versions['torch']} was installed instead of {TORCH_PIN}; delete the venv and rerun")
    return versions


# ------------------------------------------------------------------------------------------- checkpoints


def ensure_checkpoints(scale: str) -> dict[str, Path]:
    """base, a, b under CKPTS/<scale>/, generated once (seeded) and reused while the recipe is unchanged."""
    import torch
    import transformers

    root = CKPTS / scale
    paths = {name: root / name for name in ("base", "a", "b")}
    stamp = {"version": CKPT_VERSION, "config": SCALES[scale], "noise": NOISE, "torch": torch.__version__,
             "transformers": transformers.__version__}
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == CKPT_VERSION and all(p.is_dir() for p in paths.values()):
        return paths
    log(f"generating checkpoints in {root}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**SCALES[scale], tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(paths["base"])
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)
        tuned = {}
        for k, v in base.items():
            f = v.float()
            rms = float(f.square().mean().sqrt())
            tuned[k] = (f + torch.randn(f.shape, generator=g) * (NOISE * rms)).to(v.dtype)
        model.load_state_dict(tuned)
        model.save_pretrained(paths[name])
    stamp["params"] = sum(v.numel() for v in base.values())
    marker.write_text(json.dumps(stamp, indent=2))
    return paths


# ------------------------------------------------------------------------------------------------ timing


def _parse_time_v(text: str) -> tuple[float | None, float | None]:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    wall_s = None
    if wall:
        h, m, s = wall.groups()
        wall_s = int(h or 0) * 3600 + int(m) * 60 + float(s)
    return wall_s, (int(rss.group(1)) * 1024 if rss else None)


def _poll_tree_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.is_set():
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak[0] = max(peak[0], total)
        done.wait(0.02)


def run_measured(cmd: list[str], out_dir: Path) -> dict:
    """Run ``cmd`` (which writes ``out_dir``) once: wall seconds, peak RSS bytes, load average before."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    load = os.getloadavg()[0]
    if TIME.exists():
        full = [str(TIME), "-v", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True, env=child_env(), cwd=WORK)
        wall = time.perf_counter() - start
        _, rss = _parse_time_v(proc.stderr)
        how = "/usr/bin/time -v"
    else:
        peak, done = [0], threading.Event()
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=WORK)
        poller = threading.Thread(target=_poll_tree_rss, args=(p.pid, peak, done), daemon=True)
        poller.start()
        stdout, stderr = p.communicate()
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
        rss, how = peak[0], "psutil tree poller (20 ms)"
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "max_rss_bytes": rss, "load_before": load, "measured_by": how}


# ------------------------------------------------------------------------------------------------ jobs


def symmerge_cmd(job: str, ck: dict[str, Path], out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "symmerge"
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "symmerge.cli"]
    if job == "linear":
        return [*cli, "merge", str(ck["a"]), str(ck["b"]), "--method", "linear", "--weights", "0.5,0.5", "--align", "none",
                "--dtype", "bfloat16", "--out", str(out), "-q"]
    return [*cli, "merge", str(ck["a"]), str(ck["b"]), "--method", "ties", "--base", str(ck["base"]), "--align", "none",
            "--param", "density=0.2", "--param", "lambda=1", "--dtype", "bfloat16", "--out", str(out), "-q"]


def mergekit_config(job: str, ck: dict[str, Path]) -> str:
    if job == "linear":
        return (f"merge_method: linear\ndtype: bfloat16\nmodels:\n"
                f"  - model: {ck['a']}\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {ck['b']}\n    parameters: {{weight: 0.5}}\n")
    dtype = "dtype: bfloat16\n" if job == "ties" else "dtype: float32\nout_dtype: bfloat16\n"
    return (f"merge_method: ties\n{dtype}base_model: {ck['base']}\nparameters: {{normalize: true, lambda: 1.0}}\nmodels:\n"
            f"  - model: {ck['a']}\n    parameters: {{weight: 1.0, density: 0.2}}\n"
            f"  - model: {ck['b']}\n    parameters: {{weight: 1.0, density: 0.2}}\n")


def mergekit_cmd(job: str, ck: dict[str, Path], out: Path) -> list[str]:
    cfg = WORK / f"{job}.yml"
    cfg.write_text(mergekit_config(job, ck))
    return [str(MK_VENV / "bin" / "mergekit-yaml"), str(cfg), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]


JOBS = {  # job → (symmerge job, description)
    "linear": "linear 0.5/0.5, bf16",
    "ties": "TIES density 0.2, λ 1, bf16 (mergekit computes in bf16)",
    "ties_f32": "TIES density 0.2, λ 1, bf16 out (mergekit dtype float32 + out_dtype bfloat16)",
}


def bench_job(job: str, ck: dict[str, Path], tools: list[str], repeats: int, slow_repeats: int) -> dict[str, dict]:
    """Runs interleaved (symmerge, mergekit, symmerge, ...); outputs of the last run kept as WORK/<job>-<tool>."""
    builders = {"symmerge": lambda out: symmerge_cmd("linear" if job == "linear" else "ties", ck, out),
                "mergekit": lambda out: mergekit_cmd(job, ck, out)}
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    wanted = {t: repeats for t in tools}
    rep = 0
    while any(len(runs[t]) < wanted[t] for t in tools):
        for tool in tools:
            if len(runs[tool]) >= wanted[tool]:
                continue
            out = WORK / f"{job}-{tool}"
            r = run_measured(builders[tool](out), out)
            runs[tool].append(r)
            log(f"  {job:<9} {tool:<9} run {len(runs[tool])}: {r['wall_s']:7.2f} s  {r['max_rss_bytes'] / 1e9:5.2f} GB  "
                f"(load {r['load_before']:.2f})")
            if rep == 0 and r["wall_s"] > SLOW_S:
                wanted[tool] = min(repeats, slow_repeats)
        rep += 1
    return {t: {"runs": rs, "wall_s": statistics.median(r["wall_s"] for r in rs),
                "max_rss_gb": statistics.median(r["max_rss_bytes"] for r in rs) / 1e9,
                "command": " ".join(builders[t](WORK / f"{job}-{t}"))} for t, rs in runs.items()}


# --------------------------------------------------------------------------------------------- agreement


def _load(out: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def compare(out_a: Path, out_b: Path) -> dict:
    """Max |a − b| (float32) over all tensors, and how many entries differ."""

    a, b = _load(out_a), _load(out_b)
    if set(a) != set(b):
        return {"error": f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"}
    max_abs, max_rel_key, differ, total, dtypes = 0.0, None, 0, 0, set()
    worst = []
    for k in a:
        dtypes.add(f"{a[k].dtype}/{b[k].dtype}")
        d = (a[k].float() - b[k].float()).abs()
        n_diff = int((d > 0).sum())
        differ += n_diff
        total += d.numel()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, max_rel_key = m, k
        worst.append((n_diff / max(d.numel(), 1), k))
    worst.sort(reverse=True)
    return {"tensors": len(a), "entries": total, "max_abs_diff": max_abs, "max_abs_diff_tensor": max_rel_key,
            "differing_entries": differ, "differing_fraction": differ / max(total, 1), "dtypes": sorted(dtypes),
            "most_differing_tensors": [{"tensor": k, "fraction": f} for f, k in worst[:3]]}


def ties_attribution(ck: dict[str, Path], out_symmerge: Path, out_mergekit: Path, density: float = 0.2) -> dict:
    """Where the two TIES outputs differ, and why.

    Both tools keep the top ``density`` of each tensor's ``|τ_i|``, ``τ_i = θ_i − base``, but pick differently among
    entries *tied* with the threshold ``t_i`` (the k-th largest ``|τ_i|``): symmerge keeps the first ones in memory
    order (``round(density·n)`` in all), mergekit those its unstable ``argsort`` puts first (``floor(density·n)``).
    Task vectors of bf16 checkpoints take few distinct values, so ties are common. Where both models' kept
    entries cancel (``τ̂_a + τ̂_b = 0``) mergekit elects + and keeps the positive one, symmerge elects nothing.
    Anything else is arithmetic: mergekit with ``dtype: bfloat16`` computes the deltas, sums and means in bf16.
    Returns, over all entries: fractions tied with a threshold, and the differing entries split into those
    classes (an entry counts in the first class that applies).
    """
    import torch

    from symmerge.merge.methods import magnitude_threshold

    base, a, b = _load(ck["base"]), _load(ck["a"]), _load(ck["b"])
    sym, mk = _load(out_symmerge), _load(out_mergekit)
    total = tied_entries = differ = at_tie = sign_tie = other = 0
    for key, bt in base.items():
        if not bt.is_floating_point():
            continue
        taus = [m[key].float() - bt.float() for m in (a, b)]
        tie = torch.zeros(bt.shape, dtype=torch.bool)
        for tau in taus:
            mag = tau.abs()
            t = magnitude_threshold(mag, density)
            if t > 0:
                tie |= mag == t
        cancel = (taus[0] + taus[1] == 0) & (taus[0] != 0)
        d = sym[key].float() != mk[key].float()
        total += bt.numel()
        tied_entries += int(tie.sum())
        differ += int(d.sum())
        at_tie += int((d & tie).sum())
        sign_tie += int((d & ~tie & cancel).sum())
        other += int((d & ~tie & ~cancel).sum())
    return {"entries": total, "tied_with_threshold_fraction": tied_entries / total, "differing_fraction": differ / total,
            "differing_at_threshold_ties": at_tie / max(differ, 1), "differing_at_cancelling_entries": sign_tie / max(differ, 1),
            "differing_other": other / max(differ, 1)}


# ------------------------------------------------------------------------------------------------ report


def render(results: dict) -> str:
    m = results["machine"]
    tools = ["symmerge", "mergekit"]
    lines = ["| job | tool | wall s (median) | runs | max RSS GB | wall symmerge/mergekit | RSS symmerge/mergekit |",
             "|---|---|---|---|---|---|---|"]
    for job, res in results["jobs"].items():
        for tool in tools:
            if tool not in res:
                continue
            r = res[tool]
            walls = " / ".join(f"{x['wall_s']:.2f}" for x in r["runs"])
            ratio = rratio = ""
            if tool == "symmerge" and "mergekit" in res:
                ratio = f"{r['wall_s'] / res['mergekit']['wall_s']:.3f}"
                rratio = f"{r['max_rss_gb'] / res['mergekit']['max_rss_gb']:.3f}"
            lines.append(f"| {job} | {tool} | {r['wall_s']:.2f} ({walls}) | {len(r['runs'])} | {r['max_rss_gb']:.2f} | {ratio} | {rratio} |")
    table = "\n".join(lines)
    loads = [x["load_before"] for res in results["jobs"].values() for t in tools if t in res for x in res[t]["runs"]]
    head = (f"# merge_speed ({results['scale']}: {results['params'] / 1e6:.1f} M params per checkpoint, bf16)\n\n"
            f"{m['cpus']} CPUs, OMP_WAIT_POLICY=PASSIVE, torch {m['torch']}, symmerge {m['symmerge']}, "
            f"mergekit {results.get('mergekit_versions', {}).get('mergekit', 'not run')}; "
            f"load average {min(loads, default=0):.2f}–{max(loads, default=0):.2f} (1-min, before each run; shared machine). "
            f"Peak memory by {results.get('measured_by', '?')} (max RSS includes mmapped input pages).\n\n")
    body = [table, ""]
    if results.get("agreement"):
        body += ["## Agreement (float32 comparison of the outputs)", "", "| job | max abs diff | differing entries | fraction |", "|---|---|---|---|"]
        for job, a in results["agreement"].items():
            if "error" in a:
                body.append(f"| {job} | {a['error']} | | |")
            else:
                body.append(f"| {job} | {a['max_abs_diff']:.3g} | {a['differing_entries']:,} / {a['entries']:,} | {a['differing_fraction']:.3%} |")
        for job, a in results["agreement"].items():
            d = a.get("attribution")
            if d:
                body += ["", f"{job}: {d['tied_with_threshold_fraction']:.2%} of all entries tie with their tensor's trim threshold "
                         f"in some model; of the differing entries {d['differing_at_threshold_ties']:.2%} lie on such a tie "
                         f"(tie-breaking of the top-k trim), {d['differing_at_cancelling_entries']:.2%} where the task vectors "
                         f"cancel (sign election: mergekit +, symmerge none), {d['differing_other']:.2%} elsewhere "
                         "(arithmetic: mergekit's bf16 compute when dtype is bfloat16)."]
    if results.get("targets"):
        body += ["", "## Targets", ""] + [f"- {k}: {'met' if v['met'] else 'MISSED'} ({v['detail']})" for k, v in results["targets"].items()]
    return head + "\n".join(body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast job and tool (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=2, help=f"runs of a job whose first run exceeds {SLOW_S:.0f} s")
    parser.add_argument("--skip-mergekit", action="store_true", help="time symmerge only (no mergekit venv needed)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full: ~168M params; small: a quick ~6M run")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--keep-outputs", action="store_true", help=f"keep the merged models under {WORK}")
    args = parser.parse_args()

    import torch

    import symmerge

    tools = ["symmerge"] if args.skip_mergekit else ["symmerge", "mergekit"]
    results: dict = {"scale": args.scale, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "symmerge": symmerge.__version__,
        "load_average_start": os.getloadavg(), "omp_wait_policy": "PASSIVE"}, "jobs": {}}
    if not args.skip_mergekit:
        results["mergekit_versions"] = ensure_mergekit()
        log(f"mergekit venv: {results['mergekit_versions']}")
    ck = ensure_checkpoints(args.scale)
    results["params"] = json.loads((CKPTS / args.scale / "complete.json").read_text())["params"]
    results["checkpoints"] = {k: str(v) for k, v in ck.items()}
    WORK.mkdir(parents=True, exist_ok=True)
    results["measured_by"] = "/usr/bin/time -v" if TIME.exists() else "psutil tree poller (20 ms)"

    symmerge_ties_done = False
    for job in args.jobs:
        job_tools = tools
        if job == "ties_f32" and symmerge_ties_done:
            job_tools = [t for t in tools if t != "symmerge"]  # symmerge runs the same command as in "ties"
        if not job_tools:
            continue
        log(f"{job}: {JOBS[job]}")
        results["jobs"][job] = bench_job(job, ck, job_tools, args.repeats, args.slow_repeats)
        symmerge_ties_done |= job == "ties" and "symmerge" in job_tools
        if job == "ties_f32" and "symmerge" not in job_tools and "ties" in results["jobs"]:
            results["jobs"][job]["symmerge"] = results["jobs"]["ties"]["symmerge"]  # same command, shared runs
    results["machine"]["load_average_end"] = os.getloadavg()

    if not args.skip_mergekit:
        results["agreement"] = {}
        for job in results["jobs"]:
            sym = WORK / ("ties-symmerge" if job == "ties_f32" else f"{job}-symmerge")
            if sym.exists() and (WORK / f"{job}-mergekit").exists():
                results["agreement"][job] = compare(sym, WORK / f"{job}-mergekit")
        for job in ("ties", "ties_f32"):
            if job in results["agreement"]:
                results["agreement"][job]["attribution"] = ties_attribution(ck, WORK / "ties-symmerge", WORK / f"{job}-mergekit")
        targets = {}
        jobs = results["jobs"]
        if "linear" in jobs:
            s, k = jobs["linear"]["symmerge"], jobs["linear"]["mergekit"]
            targets["linear: wall <= mergekit and peak RSS <= mergekit"] = {
                "met": s["wall_s"] <= k["wall_s"] and s["max_rss_gb"] <= k["max_rss_gb"],
                "detail": f"{s['wall_s']:.2f} s vs {k['wall_s']:.2f} s, {s['max_rss_gb']:.2f} GB vs {k['max_rss_gb']:.2f} GB"}
        for job in ("ties", "ties_f32"):
            if job in jobs and "mergekit" in jobs[job]:
                s, k = jobs[job]["symmerge"], jobs[job]["mergekit"]
                targets[f"{job}: >= 5x faster than mergekit"] = {
                    "met": k["wall_s"] >= 5 * s["wall_s"], "detail": f"{k['wall_s'] / s['wall_s']:.1f}x ({s['wall_s']:.2f} s vs {k['wall_s']:.2f} s)"}
        results["targets"] = targets

    report = render(results)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.scale == "full" else f"_{args.scale}"
    (RESULTS / f"merge_speed{suffix}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"merge_speed{suffix}.md").write_text(report)
    if not args.keep_outputs:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
