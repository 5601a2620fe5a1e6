"""How long aligning two full-size checkpoints takes, split by stage.

Two independently initialised BERT-base-shaped models (12 layers, d 768, 12 heads, FFN 3072) and two
GPT-2-small-shaped ones are saved as safetensors, then aligned the way ``symmerge align`` does it:
load (mmap + NaN/Inf check), FFN (similarity GEMM + exact LAP per layer), attention (head assignment +
per-head Procrustes), rescale (the extra cost of alternating rotation and quartic rescaling), write.
Finally the CLI itself is timed end to end. Prints a table, writes it to ``benchmarks/results/align_speed.json`` (this
run) and appends it to ``align_speed.md`` as a dated section (earlier runs and their notes stay).

``--before DIR``: also time the CLI of another source tree (e.g. ``git archive main | tar -x -C DIR``), alternating
with this one and the seed baseline, so a change is measured before and after under the same load; ``--before-label``
names it in the table (e.g. its commit).

    python benchmarks/align_speed.py [--repeats 3] [--families bert gpt2] [--before DIR --before-label COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import symmerge  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint, save_state_dict  # noqa: E402
from symmerge.match import lap_backend  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_pair(family: str, root: Path) -> tuple[Path, Path]:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        if family == "bert":
            model = transformers.BertModel(transformers.BertConfig())
        else:
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        path = root / f"{family}-seed{seed}"
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def time_stages(ref_dir: Path, model_dir: Path, out: Path) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    ref_ckpt, ckpt = open_checkpoint(ref_dir), open_checkpoint(model_dir)
    ref, model = load_state_dict(ref_ckpt), load_state_dict(ckpt)
    t["load"] = time.perf_counter() - start
    spec = spec_for(ref_ckpt.config, ref.keys())

    no_scale = symmerge.align(ref, model, spec=spec, symmetries="ffn,qk,vo,heads")
    full = symmerge.align(ref, model, spec=spec, symmetries="all")
    t["ffn"] = full.report.seconds["ffn"]
    t["attention"] = no_scale.report.seconds["attention"]
    t["rescale"] = max(full.report.seconds["attention"] - no_scale.report.seconds["attention"], 0.0)
    t["apply+report"] = full.report.seconds["apply"] + full.report.seconds["report"]
    t["align_total"] = sum(full.report.seconds.values())

    start = time.perf_counter()
    out.mkdir()
    save_state_dict(full.state_dict, out)
    t["write"] = time.perf_counter() - start
    shutil.rmtree(out)
    t["relative_distance_before"] = full.report.relative_before
    t["relative_distance_after"] = full.report.relative_after
    return t


CHILD_CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system) of each timed subprocess, by what it ran: on a shared machine the measure that load
does not inflate as much as wall time."""


def run_timed(what: str, command: list[str], env: dict | None = None) -> float:
    """Wall seconds of ``command``; its CPU seconds are appended to ``CHILD_CPU[what]``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CHILD_CPU.setdefault(what, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def time_cli(ref_dir: Path, model_dir: Path, out: Path, symmetries: str | None = None, source: Path | None = None) -> float:
    """``symmerge align`` end to end (Python start-up, load, align, write) with its defaults or ``-s symmetries``;
    ``source``: the source tree whose ``symmerge`` runs (default: the one this script imports)."""
    extra = [] if symmetries is None else ["-s", symmetries]
    env = dict(os.environ, PYTHONPATH=str(Path(source or Path(symmerge.__file__).parent.parent).resolve()))
    wall = run_timed(f"cli {symmetries or 'auto'}{' before' if source else ''}",
                     [sys.executable, "-m", "symmerge.cli", "align", str(ref_dir), str(model_dir), "--out", str(out), "--quiet", *extra], env)
    shutil.rmtree(out)  # 0.44 GB a run: a dozen runs would fill a small disk
    return wall


def time_seed_baseline(ref_dir: Path, model_dir: Path, out: Path) -> float:
    """benchmarks/seed_baseline.py end to end: a straightforward implementation of the seed paper's algorithm (the
    classes ``ffn,qk,vo,scale``), the yardstick of issue 10's "≤ 0.5× of the straightforward implementation"."""
    wall = run_timed("seed_baseline", [sys.executable, str(Path(__file__).parent / "seed_baseline.py"), str(ref_dir), str(model_dir), str(out)])
    shutil.rmtree(out)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["bert", "gpt2"], choices=["bert", "gpt2"])
    parser.add_argument("--before", type=Path, help="another source tree whose CLI is timed too (the seed classes, on bert)")
    parser.add_argument("--before-label", default="before", help="what --before is (e.g. its commit)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    results = {"commit": commit, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__, "lap_backend": lap_backend(), "load_average": os.getloadavg()},
               "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in args.families:
            ref_dir, model_dir = make_pair(family, root)
            runs = [time_stages(ref_dir, model_dir, root / f"{family}-out{i}") for i in range(args.repeats)]
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            median["cli_end_to_end"] = statistics.median(time_cli(ref_dir, model_dir, root / f"{family}-cli{i}") for i in range(args.repeats))
            if family == "bert":  # the seed baseline reads BERT checkpoints only; runs alternate so load drifts hit both
                cli, baseline, before = [], [], []
                for i in range(args.repeats):
                    cli.append(time_cli(ref_dir, model_dir, root / f"{family}-seedcls{i}", "ffn,qk,vo,scale"))
                    baseline.append(time_seed_baseline(ref_dir, model_dir, root / f"{family}-baseline{i}"))
                    if args.before is not None:
                        before.append(time_cli(ref_dir, model_dir, root / f"{family}-before{i}", "ffn,qk,vo,scale", args.before))
                median["cli_seed_classes"] = statistics.median(cli)
                median["seed_baseline"] = statistics.median(baseline)
                if before:
                    median["cli_seed_classes_before"] = statistics.median(before)
                median["cpu_seconds"] = {what: statistics.median(v) for what, v in CHILD_CPU.items()}
            median["params"] = sum(s.numel() for s in load_state_dict(open_checkpoint(ref_dir)).values())
            results["families"][family] = median

    stages = ["load", "ffn", "attention", "rescale", "apply+report", "write", "align_total", "cli_end_to_end"]
    lines = [f"| family | params | {' | '.join(stages)} | relative distance before → after |", "|" + "---|" * (len(stages) + 3)]
    for family, r in results["families"].items():
        cells = " | ".join(f"{r[s]:.2f}" for s in stages)
        lines.append(f"| {family} | {r['params'] / 1e6:.0f}M | {cells} | {r['relative_distance_before']:.4f} → {r['relative_distance_after']:.4f} |")
    for family, r in results["families"].items():
        if "seed_baseline" in r:
            lines += ["", f"{family}, the seed paper's classes (`-s ffn,qk,vo,scale`) end to end: symmerge CLI {r['cli_seed_classes']:.2f} s, "
                          f"benchmarks/seed_baseline.py {r['seed_baseline']:.2f} s: **{r['cli_seed_classes'] / r['seed_baseline']:.2f}×** "
                          "(issue 10's target: ≤ 0.5×)."]
            if "cli_seed_classes_before" in r:
                lines += [f"In the same run, the CLI of {args.before_label}: {r['cli_seed_classes_before']:.2f} s "
                          f"({r['cli_seed_classes_before'] / r['seed_baseline']:.2f}× the baseline)."]
            lines += ["CPU seconds (user + system, median): " + ", ".join(f"{what} {cpu:.2f}" for what, cpu in r["cpu_seconds"].items()) + "."]
    results["machine"]["load_average_end"] = os.getloadavg()
    table = "\n".join(lines)
    header = (f"Median of {args.repeats} runs, seconds (wall), at commit {commit}. {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, "
              f"LAP: {results['machine']['lap_backend']}, load average at start {results['machine']['load_average'][0]:.2f}, "
              f"at end {results['machine']['load_average_end'][0]:.2f}.\n"
              "align_total = ffn + attention (with rescale) + apply + report; cli_end_to_end includes Python start-up, load and write.\n")
    print(header)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "align_speed.json").write_text(json.dumps(results, indent=2))
    # the .md keeps every run as a dated section, with the notes written beside it: append, never overwrite
    section = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit} (`benchmarks/align_speed.py`)\n\n{header}\n{table}\n"
    md = RESULTS / "align_speed.md"
    md.write_text((md.read_text().rstrip("\n") + "\n\n" if md.exists() else "") + section)


if __name__ == "__main__":
    main()
