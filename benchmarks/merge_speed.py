"""symmerge merge vs mergekit: wall time and peak memory of every merge method the two tools share.

Three ~168M-parameter LLaMA checkpoints (hidden 1024, 8 layers, FFN 2816, vocab 32000, 16 heads, untied
embeddings, bf16 safetensors) are generated once and cached: a random ``base`` and two
"fine-tunes" ``a``/``b`` = base + Gaussian noise of 1% of each tensor's RMS. mergekit is installed into its own
virtualenv (torch pinned to the local CPU wheel), never into the project's. Each job (:func:`recipes`: linear,
slerp, nuslerp, multislerp, karcher, task_arithmetic, ties, ties_f32, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear, sce, model_stock, nearswap, arcee_fusion, passthrough, ram, ramplus_tl) is
one mergekit YAML recipe, run by ``mergekit-yaml`` and by ``symmerge merge`` (the same YAML plus
``alignment: none``), each as a separate process under ``/usr/bin/time -v`` (or a psutil poller of the process
tree's RSS when that is missing), the two tools interleaved so that both see the same machine load; the median of
the runs is reported, with the ratio (the machine is shared: ratios are the comparable figures).

mergekit computes in the recipe's ``dtype: bfloat16`` (its usual setting; ``ties_f32`` uses ``dtype: float32`` +
``out_dtype: bfloat16``, float32 math like symmerge's); symmerge computes in float32 and rounds once to bf16.
Outputs of deterministic methods are compared tensor by tensor in float32 (TIES: the differing entries are
attributed to their causes — ties at the trim threshold, common in bf16 task vectors, which mergekit's ``argsort``
and symmerge's memory-order tie-break resolve differently; cancelling task vectors, where mergekit elects +; and
mergekit's bf16 arithmetic; see :func:`ties_attribution`).

Results go to ``benchmarks/results/merge_speed.{json,md}``; the json holds one row per job, and a partial run
(``--jobs ties``) replaces only its jobs' rows, so no earlier measurement is lost.

    .venv/bin/python benchmarks/merge_speed.py [--jobs JOB ...] [--repeats 3] [--scale full|small] [--skip-mergekit]
"""

from __future__ import annotations

import argparse
import fcntl
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
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
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
        cpu = _cpu_seconds(proc.stderr)
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
        rss, how, cpu = peak[0], "psutil tree poller (20 ms)", None
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "max_rss_bytes": rss, "load_before": load, "measured_by": how}


def _cpu_seconds(text: str) -> float | None:
    """User + system CPU seconds from ``time -v``: less sensitive to other jobs on the machine than wall time."""
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return float(user.group(1)) + float(system.group(1)) if user and system else None


# ------------------------------------------------------------------------------------------------ jobs


def recipes(ck: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    """job → (description, mergekit YAML recipe). symmerge runs the same recipe plus ``alignment: none``. mergekit
    computes in ``dtype`` (bfloat16, its usual setting; ``ties_f32``: float32 + ``out_dtype``), symmerge always in
    float32, rounded once to the bf16 output. Every method the two tools share, with typical parameters."""
    a, b, base = str(ck["a"]), str(ck["b"]), str(ck["base"])
    w = lambda x, y=None: [{"model": a, "parameters": {"weight": x}}, {"model": b, "parameters": {"weight": x if y is None else y}}]  # noqa: E731
    two = [{"model": a}, {"model": b}]
    bf16 = {"dtype": "bfloat16"}

    def tv(method: str, params: dict, models: list | None = None, dtype: dict = bf16) -> dict:
        return {"merge_method": method, **dtype, "base_model": base, "parameters": params, "models": models or w(1.0)}

    layers = json.loads((ck["a"] / "config.json").read_text())["num_hidden_layers"]
    return {
        "linear": ("linear 0.5/0.5", {"merge_method": "linear", **bf16, "models": w(0.5)}),
        "slerp": ("slerp t 0.5 (base a)", {"merge_method": "slerp", **bf16, "base_model": a, "parameters": {"t": 0.5}, "models": two}),
        "nuslerp": ("nuslerp 0.5/0.5", {"merge_method": "nuslerp", **bf16, "models": w(0.5)}),
        "multislerp": ("multislerp 0.5/0.5", {"merge_method": "multislerp", **bf16, "models": w(0.5)}),
        "karcher": ("karcher mean", {"merge_method": "karcher", **bf16, "models": two}),
        "task_arithmetic": ("task arithmetic λ 1", tv("task_arithmetic", {"lambda": 1.0})),
        "ties": ("TIES density 0.2, λ 1 (mergekit computes in bf16)", tv("ties", {"normalize": True, "lambda": 1.0, "density": 0.2})),
        "ties_f32": ("TIES density 0.2, λ 1 (mergekit dtype float32 + out_dtype bfloat16)",
                     tv("ties", {"normalize": True, "lambda": 1.0, "density": 0.2}, dtype={"dtype": "float32", "out_dtype": "bfloat16"})),
        "dare_ties": ("DARE-TIES density 0.5 (random masks)", tv("dare_ties", {"density": 0.5})),
        "dare_linear": ("DARE linear density 0.5 (random masks)", tv("dare_linear", {"density": 0.5})),
        "breadcrumbs": ("breadcrumbs density 0.8, γ 0.05", tv("breadcrumbs", {"density": 0.8, "gamma": 0.05})),
        "breadcrumbs_ties": ("breadcrumbs_ties density 0.8, γ 0.05", tv("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05})),
        "della": ("DELLA density 0.5, ε 0.1 (random masks)", tv("della", {"density": 0.5, "epsilon": 0.1})),
        "della_linear": ("DELLA linear density 0.5, ε 0.1 (random masks)", tv("della_linear", {"density": 0.5, "epsilon": 0.1})),
        "sce": ("SCE select_topk 0.5", tv("sce", {"select_topk": 0.5})),
        "model_stock": ("model stock (2 models)", tv("model_stock", {}, models=two)),
        "nearswap": ("nearswap t 0.001 (a with base)", tv("nearswap", {"t": 0.001}, models=[{"model": a}])),
        "arcee_fusion": ("arcee_fusion (a with base)", tv("arcee_fusion", {}, models=[{"model": a}])),
        "passthrough": (f"passthrough frankenmerge a[0:{layers // 2 + 1}] + b[{layers // 2 - 1}:{layers}]", {
            "merge_method": "passthrough", **bf16,
            "slices": [{"sources": [{"model": a, "layer_range": [0, layers // 2 + 1]}]},
                       {"sources": [{"model": b, "layer_range": [layers // 2 - 1, layers]}]}]}),
        "ram": ("RAM", tv("ram", {})),
        "ramplus_tl": ("RAM+ (ramplus_tl)", tv("ramplus_tl", {})),
    }


#: Jobs whose outputs differ between runs of one tool (unseeded or differently seeded random masks): no agreement.
RANDOM_JOBS = {"dare_ties", "dare_linear", "della", "della_linear"}


def symmerge_cmd(job: str, ck: dict[str, Path], out: Path) -> list[str]:
    import yaml

    cli = [sys.executable, "-m", "symmerge.cli"]  # this checkout's symmerge (child_env puts it first on PYTHONPATH)
    cfg = WORK / f"{job}.symmerge.yml"
    cfg.write_text(yaml.safe_dump({**recipes(ck)[job][1], "alignment": "none"}, sort_keys=False))
    return [*cli, "merge", str(cfg), "--out", str(out), "--force", "-q"]


def mergekit_cmd(job: str, ck: dict[str, Path], out: Path) -> list[str]:
    import yaml

    cfg = WORK / f"{job}.mergekit.yml"
    cfg.write_text(yaml.safe_dump(recipes(ck)[job][1], sort_keys=False))
    return [*mergekit_yaml(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card", "--allow-crimes"]


def mergekit_yaml() -> list[str]:
    """``mergekit-yaml`` through the venv's interpreter: the console script's shebang names the folder the venv was
    created in, which breaks when the cache is shared between checkouts."""
    return [str(MK_VENV / "bin" / "python"), "-c", "import sys; from mergekit.scripts.run_yaml import main; "
            "sys.argv[0] = 'mergekit-yaml'; sys.exit(main())"]


def bench_job(job: str, ck: dict[str, Path], tools: list[str], repeats: int, slow_repeats: int) -> dict[str, dict]:
    """Runs interleaved (symmerge, mergekit, symmerge, ...) so both tools see the same load; outputs of the last
    run kept as WORK/<job>-<tool>."""
    builders = {"symmerge": lambda out: symmerge_cmd(job, ck, out), "mergekit": lambda out: mergekit_cmd(job, ck, out)}
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
            log(f"  {job:<16} {tool:<9} run {len(runs[tool])}: {r['wall_s']:7.2f} s  {r['max_rss_bytes'] / 1e9:5.2f} GB  "
                f"(load {r['load_before']:.2f})")
            if rep == 0 and r["wall_s"] > SLOW_S:
                wanted[tool] = min(repeats, slow_repeats)
        rep += 1
    return {t: {"runs": rs, "wall_s": statistics.median(r["wall_s"] for r in rs),
                "cpu_s": statistics.median(r["cpu_s"] for r in rs) if all(r.get("cpu_s") for r in rs) else None,
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


def targets_of(results: dict) -> dict:
    """Per job: symmerge no slower than mergekit and no more peak memory; TIES (both variants) >= 5x faster."""
    out = {}
    for job, res in results["jobs"].items():
        if "mergekit" not in res or "symmerge" not in res:
            continue
        s, k = res["symmerge"], res["mergekit"]
        detail = (f"{k['wall_s'] / s['wall_s']:.2f}x ({s['wall_s']:.2f} s vs {k['wall_s']:.2f} s), "
                  f"{s['max_rss_gb']:.2f} GB vs {k['max_rss_gb']:.2f} GB")
        out[f"{job}: wall <= mergekit and peak RSS <= mergekit"] = {
            "met": s["wall_s"] <= k["wall_s"] and s["max_rss_gb"] <= k["max_rss_gb"], "detail": detail}
        if job in ("ties", "ties_f32"):
            out[f"{job}: >= 5x faster than mergekit"] = {"met": k["wall_s"] >= 5 * s["wall_s"], "detail": detail}
    return out


def render(results: dict) -> str:
    tools = ["symmerge", "mergekit"]
    lines = ["| job | tool | wall s (median of runs) | CPU s | max RSS GB | mergekit/symmerge wall | mergekit/symmerge CPU | "
             "symmerge/mergekit RSS | load (1-min) | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [j for j in JOB_ORDER if j in results["jobs"]] + [j for j in results["jobs"] if j not in JOB_ORDER]
    for job in order:
        res = results["jobs"][job]
        for tool in tools:
            if tool not in res:
                continue
            r = res[tool]
            walls = " / ".join(f"{x['wall_s']:.2f}" for x in r["runs"])
            loads = [x["load_before"] for x in r["runs"]]
            ratio = rratio = cratio = ""
            if tool == "symmerge" and "mergekit" in res:
                ratio = f"**{res['mergekit']['wall_s'] / r['wall_s']:.2f}x**"
                rratio = f"{r['max_rss_gb'] / res['mergekit']['max_rss_gb']:.3f}"
                if r.get("cpu_s") and res["mergekit"].get("cpu_s"):
                    cratio = f"{res['mergekit']['cpu_s'] / r['cpu_s']:.2f}x"
            cpu = f"{r['cpu_s']:.1f}" if r.get("cpu_s") else "?"
            when = res.get("measured_at", "?") + (f" @{res['symmerge_commit']}" if tool == "symmerge" and res.get("symmerge_commit") else "")
            lines.append(f"| {job} | {tool} | {r['wall_s']:.2f} ({walls}) | {cpu} | {r['max_rss_gb']:.2f} | {ratio} | {cratio} | {rratio} | "
                         f"{min(loads):.1f}–{max(loads):.1f} | {when} |")
    table = "\n".join(lines)
    m = results["machine"]
    head = (f"# merge_speed ({results['scale']}: {results['params'] / 1e6:.1f} M params per checkpoint, bf16)\n\n"
            f"{m['cpus']} CPUs (shared with other jobs: compare the ratios, both tools ran back to back), "
            f"OMP_WAIT_POLICY=PASSIVE, torch {m['torch']}, mergekit {results.get('mergekit_versions', {}).get('mergekit', 'not run')}. "
            f"Each job: the two tools interleaved, median of the runs; load = 1-min load average before each run. "
            f"Peak memory by {results.get('measured_by', '?')} (max RSS includes mmapped input pages); CPU s = user + system "
            "time of the process tree, less sensitive to the machine's load than wall time. "
            "mergekit computes in the recipe's `dtype` (bfloat16) except in `ties_f32`; symmerge always in float32, "
            "rounded once to bf16. Rows are kept across partial runs (`--jobs`): see `measured`.\n\n")
    for job in order:
        head += f"- `{job}`: {results['jobs'][job].get('description', '')}\n"
    body = ["", table, ""]
    if results.get("agreement"):
        body += ["## Agreement (float32 comparison of the outputs)", "", "| job | max abs diff | differing entries | fraction |", "|---|---|---|---|"]
        for job in [j for j in order if j in results["agreement"]]:
            a = results["agreement"][job]
            if "error" in a:
                body.append(f"| {job} | {a['error']} | | |")
            else:
                body.append(f"| {job} | {a['max_abs_diff']:.3g} | {a['differing_entries']:,} / {a['entries']:,} | {a['differing_fraction']:.3%} |")
        body.append("")
        body.append("Random-mask methods (" + ", ".join(sorted(RANDOM_JOBS)) + ") are not compared: mergekit's masks are unseeded.")
        for job, a in results["agreement"].items():
            d = a.get("attribution")
            if d:
                body += ["", f"{job}: {d['tied_with_threshold_fraction']:.2%} of all entries tie with their tensor's trim threshold "
                         f"in some model; of the differing entries {d['differing_at_threshold_ties']:.2%} lie on such a tie "
                         f"(tie-breaking of the top-k trim), {d['differing_at_cancelling_entries']:.2%} where the task vectors "
                         f"cancel (sign election: mergekit +, symmerge none), {d['differing_other']:.2%} elsewhere "
                         "(arithmetic: mergekit's bf16 compute when dtype is bfloat16)."]
    if results.get("errors"):
        body += ["", "## Failed jobs", ""] + [f"- {job}: `{' '.join(err.split())[-400:]}`" for job, err in results["errors"].items()]
    targets = targets_of(results)
    if targets:
        body += ["", "## Targets", ""] + [f"- {k}: {'met' if v['met'] else 'MISSED'} ({v['detail']})" for k, v in targets.items()]
    return head + "\n".join(body) + "\n"


def save_merged(results: dict, jobs: list[str], json_path: Path, md_path: Path) -> dict:
    """Write ``results``' rows of ``jobs`` into the results file as it is now (another run may have added rows since
    this one started: runs of different jobs may go in parallel), under a lock; render the markdown. Returns the
    merged results."""
    RESULTS.mkdir(exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "merge_speed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(json_path.read_text()) if json_path.exists() else {}
        if current.get("scale") != results["scale"] or current.get("format") != RESULTS_FORMAT:
            current = {}
        merged = {**current, **{k: v for k, v in results.items() if k not in ("jobs", "agreement", "errors")}}
        for part in ("jobs", "agreement", "errors"):
            rows = dict(current.get(part, {}))
            for job in jobs:
                rows.pop(job, None)
                if job in results.get(part, {}):
                    rows[job] = results[part][job]
            merged[part] = rows
        json_path.write_text(json.dumps(merged, indent=2, default=str))
        md_path.write_text(render(merged))
    return merged


def git_commit() -> str | None:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "symmerge"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (p.stdout.strip() + ("+dirty" if dirty else "")) if p.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per job and tool (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=3, help=f"runs of a job whose first run exceeds {SLOW_S:.0f} s")
    parser.add_argument("--skip-mergekit", action="store_true", help="time symmerge only (no mergekit venv needed)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full: ~168M params; small: a quick ~6M run")
    parser.add_argument("--jobs", nargs="+", choices=JOB_ORDER, default=JOB_ORDER,
                        help="jobs to run; the others keep their earlier rows in the results")
    parser.add_argument("--keep-outputs", action="store_true", help=f"keep the merged models under {WORK}")
    parser.add_argument("--no-agreement", action="store_true", help="skip the output comparison (saves a few seconds per job)")
    args = parser.parse_args()

    import torch

    import symmerge

    suffix = "" if args.scale == "full" else f"_{args.scale}"
    json_path, md_path = RESULTS / f"merge_speed{suffix}.json", RESULTS / f"merge_speed{suffix}.md"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    if previous.get("scale") != args.scale or previous.get("format") != RESULTS_FORMAT:
        previous = {}  # another layout or scale: start afresh
    tools = ["symmerge"] if args.skip_mergekit else ["symmerge", "mergekit"]
    results: dict = {"format": RESULTS_FORMAT, "scale": args.scale, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "symmerge": symmerge.__version__,
        "omp_wait_policy": "PASSIVE"}, "jobs": dict(previous.get("jobs", {})), "agreement": dict(previous.get("agreement", {}))}
    if not args.skip_mergekit:
        results["mergekit_versions"] = ensure_mergekit()
        log(f"mergekit venv: {results['mergekit_versions']}")
    elif "mergekit_versions" in previous:
        results["mergekit_versions"] = previous["mergekit_versions"]
    ck = ensure_checkpoints(args.scale)
    results["params"] = json.loads((CKPTS / args.scale / "complete.json").read_text())["params"]
    results["checkpoints"] = {k: str(v) for k, v in ck.items()}
    WORK.mkdir(parents=True, exist_ok=True)
    results["measured_by"] = "/usr/bin/time -v" if TIME.exists() else "psutil tree poller (20 ms)"
    commit = git_commit()
    descriptions = {job: d for job, (d, _) in recipes(ck).items()}

    for job in args.jobs:
        log(f"{job}: {descriptions[job]}  (load {os.getloadavg()[0]:.2f})")
        try:
            row = bench_job(job, ck, tools, args.repeats, args.slow_repeats)
        except SystemExit as e:  # one tool refused or crashed: record it, go on with the other jobs
            log(f"  {job} failed: {str(e)[:2000]}")
            results.setdefault("errors", {})[job] = str(e)[-1500:]
            results = save_merged(results, [job], json_path, md_path)
            continue
        results.get("errors", {}).pop(job, None)
        if args.skip_mergekit and "mergekit" in results["jobs"].get(job, {}):
            row["mergekit"] = results["jobs"][job]["mergekit"]  # an earlier mergekit measurement of the same job
        row.update(description=descriptions[job], measured_at=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), symmerge_commit=commit)
        results["jobs"][job] = row
        results["agreement"].pop(job, None)
        sym, mk = WORK / f"{job}-symmerge", WORK / f"{job}-mergekit"
        if not args.no_agreement and job not in RANDOM_JOBS and sym.exists() and mk.exists():
            results["agreement"][job] = compare(sym, mk)
            if job in ("ties", "ties_f32"):
                results["agreement"][job]["attribution"] = ties_attribution(ck, sym, mk)
        if not args.keep_outputs:
            shutil.rmtree(sym, ignore_errors=True)
            shutil.rmtree(mk, ignore_errors=True)
        # write after every job: an interrupted sweep keeps what it measured
        results = save_merged(results, [job], json_path, md_path)

    print(render(results))  # WORK stays: a parallel run of other jobs may be using it (each job removed its outputs)


RESULTS_FORMAT = 2  # the json's layout: jobs keyed by name, merged across partial runs
JOB_ORDER = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "ties_f32", "dare_ties", "dare_linear",
             "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nearswap", "arcee_fusion", "passthrough",
             "ram", "ramplus_tl"]


if __name__ == "__main__":
    main()
