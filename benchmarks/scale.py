"""Scale: align and merge LLaMA-shaped checkpoints at 1B and 7B on this machine; wall time and peak memory per job.

Checkpoints (random bf16 weights, std 0.02, norm gains 1 + N(0, 0.02²), sharded safetensors of ≤ 2 GB, untied
head) are generated shard by shard — never a whole model in memory — under the repository's ``.cache/scale/<size>/``
(``<size>-L<n>/`` with ``--layers n``; ``$SYMMERGE_SCALE_CACHE`` moves it):
``a`` and ``b`` independent (seeds 1, 2), ``ft`` = ``a`` + Gaussian noise of 1% of each tensor's RMS (a fine-tune
of ``a``; reusing ``a`` as its base saves one model of disk). Each job runs in its own process; a sampler reads
``RssAnon`` and ``VmRSS`` from ``/proc/PID/status`` every 50 ms (peak anonymous memory is what the process itself
allocated; RSS adds the mapped checkpoint pages, clean file cache the kernel can drop). The load average is recorded
before each job. Writes ``benchmarks/results/scale.{json,md}``.

    python benchmarks/scale.py generate --size 7b          # the checkpoints only
    python benchmarks/scale.py generate --size 7b --layers 2   # 7B widths, 2 layers: a, b under <cache>/7b-L2/
    python benchmarks/scale.py run --size 1b --jobs align,merge,align_ft
    python benchmarks/scale.py run --size 1b --jobs align_residual --repo /path/to/other/checkout --tag before

``--device cpu|cuda|auto`` passes ``--device`` to every symmerge job (where the similarity GEMMs, SVDs and
statistics run; the LAPs stay on the CPU) and records the device's name with each row, so the same measurement runs
on a GPU machine: ``python benchmarks/scale.py run --size 7b --jobs align,merge --device cuda --tag cuda``.
``--repo`` runs another checkout's code (a before/after comparison with the same script); ``--tag`` keys the rows
in ``scale.json`` (``1b/align_residual@before``); ``--work`` is the scratch folder for the outputs.
``align_residual``/``merge_residual``: ``-s all,residual --max-seconds 1``, i.e. exactly one descent round per start
(the first round always runs): the same work before and after, bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(os.environ.get("SYMMERGE_SCALE_CACHE") or REPO / ".cache" / "scale")  # 2 × 13.5 GB at 7B: worktrees can share one
SHARD_BYTES = 2 * 1024**3
NOISE = 0.01
SIZES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000, num_attention_heads=32,
               num_key_value_heads=32),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5504, vocab_size=32000, num_attention_heads=16,
               num_key_value_heads=16),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=352, vocab_size=1000, num_attention_heads=4,
                 num_key_value_heads=4),
}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sizes(size: str, layers: int | None = None) -> dict:
    """The config sizes of ``size``; ``layers``: that many decoder layers instead (same widths, vocabulary and heads),
    so the per-layer and the constant (embedding, LM head) costs of a job can be measured apart at 7B widths."""
    if layers is not None and layers < 1:
        raise SystemExit(f"--layers {layers}: at least one layer")
    return {**SIZES[size], **({} if layers is None else {"num_hidden_layers": layers})}


def folder(size: str, layers: int | None = None) -> str:
    """The cache folder's name: ``7b``, or ``7b-L2`` for a 2-layer model of 7B widths."""
    return size if layers is None else f"{size}-L{layers}"


def config_dict(size: str, layers: int | None = None) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, **sizes(size, layers)}


def tensor_shapes(size: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    c = sizes(size, layers)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def _write_sharded(directory: Path, tensors, config: dict) -> None:
    """``tensors``: an iterator of (name, tensor); shards are written as they fill (≤ SHARD_BYTES each)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    files, weight_map, size, total = [], {}, 0, 0

    def flush() -> None:
        name = f"part-{len(files):05d}.safetensors"
        save_file(shards[-1], tmp / name, metadata={"format": "pt"})
        files.append((name, list(shards[-1])))
        shards.append({})

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            shards[-2] = {}
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(files)
    for i, (name, keys) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        weight_map.update({k: final for k in keys})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _random_tensors(size: str, seed: int, layers: int | None = None):
    g = torch.Generator().manual_seed(seed)
    for name, shape in tensor_shapes(size, layers):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.02 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        yield name, t.to(torch.bfloat16)


def _fine_tuned(base: Path, seed: int):
    g = torch.Generator().manual_seed(seed)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    handles = {}
    for name, file in index.items():
        if file not in handles:
            handles.clear()  # one shard open at a time
            handles[file] = safe_open(base / file, "pt")
        v = handles[file].get_tensor(name).float()
        rms = float(v.square().mean().sqrt())
        yield name, (v + torch.randn(v.shape, generator=g) * (NOISE * rms)).to(torch.bfloat16)


def ensure_checkpoints(size: str, layers: int | None = None, fine_tune: bool = True) -> dict[str, Path]:
    """Generate what is missing of ``a``, ``b`` (and ``ft`` when ``fine_tune``) under ``ROOT/folder(size, layers)``."""
    root = ROOT / folder(size, layers)
    paths = {"a": root / "a", "b": root / "b", "ft": root / "ft"}
    for name, seed in (("a", 1), ("b", 2)):
        if not (paths[name] / "config.json").exists():
            log(f"generating {paths[name]}")
            _write_sharded(paths[name], _random_tensors(size, seed, layers), config_dict(size, layers))
    if fine_tune and not (paths["ft"] / "config.json").exists():
        log(f"generating {paths['ft']} (a + {NOISE:.0%} noise)")
        _write_sharded(paths["ft"], _fine_tuned(paths["a"], 3), config_dict(size, layers))
    return paths


FT_JOBS = {"align_ft", "merge_ft", "linear_none", "ties_none", "mergekit_linear", "mergekit_ties"}  # the jobs that read ``ft``


MK_VENV = REPO / ".cache" / "bench-mergekit-venv"  # benchmarks/merge_speed.py's mergekit venv
WORK = ROOT / "out"
CODE = REPO  # the checkout whose symmerge the jobs run (--repo)
DEVICE = "cpu"  # --device, passed to every symmerge job


def sample_memory(pid: int, peak: dict, done: threading.Event) -> None:
    """Peak ``RssAnon`` and ``VmRSS`` (bytes) of ``pid`` and its children, from /proc every 50 ms."""
    def read(p: int) -> tuple[int, int]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            return 0, 0
        anon = re.search(r"RssAnon:\s+(\d+) kB", text)
        rss = re.search(r"VmRSS:\s+(\d+) kB", text)
        return (int(anon.group(1)) * 1024 if anon else 0, int(rss.group(1)) * 1024 if rss else 0)

    while not done.is_set():
        pids = [pid]
        try:
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
        anon = rss = 0
        for p in pids:
            a, r = read(p)
            anon, rss = anon + a, rss + r
        peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
        done.wait(0.05)


def run_job(name: str, cmd: list[str], out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    load = os.getloadavg()
    peak, done = {"anon": 0, "rss": 0}, threading.Event()
    log(f"{name}: {' '.join(cmd)} (load {load[0]:.2f})")
    env = {**os.environ, "PYTHONPATH": str(CODE), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the job's own CPU time: on a shared machine, wall time is the others' too
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    done.set()
    sampler.join()
    device = device_name(DEVICE) if "symmerge.cli" in cmd else "cpu (mergekit, no --cuda)"
    result = {"job": name, "device": device, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "peak_anon_gb": round(peak["anon"] / 1e9, 2), "peak_rss_gb": round(peak["rss"] / 1e9, 2),
              "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()], "rc": proc.returncode,
              "cmd": " ".join(cmd)}
    report = out / "alignment.json"
    if report.exists():
        models = json.loads(report.read_text())["models"]
        result["stages_s"] = {k: round(v, 1) for m in models.values() for k, v in m.get("seconds", {}).items()}
        residual = [g["details"] for m in models.values() for g in m.get("groups", []) if g.get("kind") == "residual"]
        if residual:  # the descent's own record: seconds per round of the start kept, each start's final distance
            result["residual"] = {k: residual[0][k] for k in ("round_seconds", "start", "final_distance", "iterations",
                                                                 "stopped_by_max_seconds") if k in residual[0]}
    card = out / "README.md"
    if card.exists():
        found = re.findall(r"([a-z+]+)[^0-9|]*\|?\s*([0-9.]+)\s*s\b", card.read_text())
        result["card_seconds"] = found[:8]
    if proc.returncode != 0:
        result["output_tail"] = output[-2000:]
    log(f"{name}: {result}")
    shutil.rmtree(out, ignore_errors=True)  # outputs are as large as a model: keep the disk
    return result


def device_name(device: str) -> str:
    """``cpu``, or ``cuda (NVIDIA H200)``: what ``--device`` resolves to on this machine, as symmerge resolves it."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device on this machine")
    return f"cuda ({torch.cuda.get_device_name(0)})"


def commands(job: str, ck: dict[str, Path], out: Path) -> list[str]:
    cli = [sys.executable, "-m", "symmerge.cli"]
    device = ["--device", DEVICE]
    a, b, ft = (str(ck[k]) for k in ("a", "b", "ft"))
    if job == "align":
        return [*cli, "align", a, b, "-s", "all", *device, "-o", str(out), "-q"]  # issue 10's setting (merge -s all)
    if job == "align_residual":
        return [*cli, "align", a, b, "-s", "all,residual", "--max-seconds", "1", *device, "-o", str(out), "-q"]
    if job == "merge_residual":
        return [*cli, "merge", a, b, "--method", "linear", "-s", "all,residual", "--max-seconds", "1", *device, "-o", str(out), "-q"]
    if job == "align_ft":
        return [*cli, "align", a, ft, *device, "-o", str(out), "-q"]
    if job == "merge":
        return [*cli, "merge", a, b, "--method", "linear", "-s", "all", *device, "-o", str(out), "-q"]
    if job == "merge_ft":
        return [*cli, "merge", a, ft, "--method", "linear", "-s", "all", *device, "-o", str(out), "-q"]
    if job == "linear_none":
        return [*cli, "merge", a, ft, "--method", "linear", "--weights", "0.5,0.5", "--align", "none", "--dtype", "bfloat16", *device, "-o", str(out), "-q"]
    if job == "ties_none":
        return [*cli, "merge", ft, "--method", "ties", "--base", a, "--align", "none", "--param", "density=0.2", "--param", "lambda=1",
                "--dtype", "bfloat16", *device, "-o", str(out), "-q"]
    cfg = WORK / f"{job}.yml"
    if job == "mergekit_linear":
        cfg.write_text(f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                       f"  - model: {ft}\n    parameters: {{weight: 0.5}}\n")
    elif job == "mergekit_ties":
        cfg.write_text(f"merge_method: ties\ndtype: float32\nout_dtype: bfloat16\nbase_model: {a}\n"
                       f"parameters: {{normalize: true, lambda: 1.0}}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1.0, density: 0.2}}\n")
    else:
        raise SystemExit(f"unknown job {job}")
    # through the venv's interpreter: the mergekit-yaml script's shebang names the folder the venv was created in
    mergekit_yaml = [str(MK_VENV / "bin" / "python"), "-c", "import sys; from mergekit.scripts.run_yaml import main; "
                     "sys.argv[0] = 'mergekit-yaml'; sys.exit(main())"]
    return [*mergekit_yaml, str(cfg), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generate", "run"])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--layers", type=int, default=None,
                        help="that many decoder layers at the size's widths (folder <size>-L<n>; ft only when a job needs it)")
    parser.add_argument("--jobs", default="")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code the jobs run")
    parser.add_argument("--tag", default="", help="suffix of the rows' keys in scale.json (before / after)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for the jobs' outputs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="symmerge's --device for every job")
    parser.add_argument("--store", type=Path, default=RESULTS / "scale.json", help="the JSON file the rows are added to")
    args = parser.parse_args()
    global CODE, WORK, DEVICE
    CODE = args.repo.resolve()
    DEVICE = args.device
    log(f"symmerge jobs on {device_name(DEVICE)}")
    WORK = args.work or WORK
    torch.set_num_threads(2)
    jobs = [j for j in args.jobs.split(",") if j]
    fine_tune = args.layers is None if args.what == "generate" else bool(FT_JOBS & set(jobs))
    paths = ensure_checkpoints(args.size, args.layers, fine_tune)
    if args.what == "generate":
        return
    size_key = folder(args.size, args.layers)
    WORK.mkdir(parents=True, exist_ok=True)
    store = args.store
    results = json.loads(store.read_text()) if store.exists() else {}
    for job in jobs:
        key = f"{job}@{args.tag}" if args.tag else job
        results.setdefault(size_key, {})[key] = run_job(f"{size_key}/{key}", commands(job, paths, WORK / job), WORK / job)
        store.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
