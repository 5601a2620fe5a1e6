"""Residual class at 7B widths: seconds per descent round, per start, measured on layer-reduced pairs and projected.

A whole 7B descent round (~260 TFLOP by the cost model in ``results/scale.md``) does not fit a session on the
shared 2-core CPU, so it is measured by parts: pairs of LLaMA-7B widths (hidden 4096, 32 heads, d_ff 11008, vocab
32000, bf16, independent ``a``/``b``) with 2 and 4 decoder layers (``benchmarks/scale.py generate --size 7b --layers
N``). The script runs, through the library and on the memory-mapped checkpoints exactly as ``symmerge align A B -s
all,residual --max-seconds 1`` does (:func:`symmerge.match.residual.fit_with_residual`: fold both models lazily,
anchored start, then one descent round from each start), each stage on its own clock, because the CLI's report keeps
only the kept start's ``round_seconds``:

* ``anchored_start``: the correlation over the anchor slots (embedding, LM head, ...) and its Procrustes;
* ``descent_identity`` / ``descent_anchored``: :func:`~symmerge.match.residual.residual_descent` with ``max_iter=1``
  (one round, what ``--max-seconds 1`` leaves: the first round always runs, no second one fits). The stage also
  holds the descent's initial distance pass, which is outside its ``round_seconds``.

Per stage: wall and CPU seconds (``time.process_time``: user + sys of every thread of the process), peak
``RssAnon`` (``/proc/self/status`` every 50 ms), the 1-min load average before and after. On a shared machine CPU
seconds are the comparable measure. ``--project`` fits ``constant + layers × per_layer`` to the stored rows of one
width (two layer counts at least) and prints the 32-layer figure. Rows are keyed by the checkpoint folder's name
in ``results/residual_round.json``.

    python benchmarks/residual_round.py .cache/scale/7b-L2/a .cache/scale/7b-L2/b
    python benchmarks/residual_round.py --project 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from symmerge.groups import parse_symmetries  # noqa: E402
from symmerge.groups.stream import TransformedState  # noqa: E402
from symmerge.io import open_checkpoint  # noqa: E402
from symmerge.io.stream import LazyState  # noqa: E402
from symmerge.match import resolve_device  # noqa: E402
from symmerge.match.per_layer import ffn_group_similarity, solve_ffn  # noqa: E402
from symmerge.match.residual import anchored_start, residual_descent  # noqa: E402
from symmerge.spec import StateView, spec_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("anchored_start", "descent_identity", "descent_anchored")


def rss_anon() -> int:
    """This process's ``RssAnon`` in bytes (memory it allocated itself; mapped checkpoint pages are not in it)."""
    found = re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) * 1024 if found else 0


class Stage:
    """Wall, CPU and peak ``RssAnon`` of the code run inside ``with Stage() as s:`` (``s.row`` afterwards)."""

    def __enter__(self) -> Stage:
        self.peak, self.done = rss_anon(), threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.load = os.getloadavg()[0]
        self.sampler.start()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.done.set()
        self.sampler.join()
        self.row = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_anon_gb": round(max(self.peak, rss_anon()) / 1e9, 2),
                    "load_before": round(self.load, 2), "load_after": round(os.getloadavg()[0], 2)}


def measure(reference: Path, model: Path, symmetries: str = "all,residual", device: str = "cpu") -> dict:
    """One round per start of the residual descent on the pair, stage by stage (see the module docstring)."""
    ref_ckpt, model_ckpt = open_checkpoint(reference), open_checkpoint(model)
    ref, mod = LazyState(ref_ckpt), LazyState(model_ckpt)
    spec = spec_for(ref_ckpt.config, ref_ckpt.shapes().keys())
    per_layer = parse_symmetries(symmetries) - {"residual"}
    where = resolve_device(device)
    row: dict = {"pair": [str(reference), str(model)], "layers": len(spec.ffn),
                 "hidden": ref_ckpt.config.get("hidden_size"), "symmetries": symmetries, "device": str(where),
                 "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with Stage() as s:  # as fit_with_residual: both models folded lazily, the start from the anchor slots
        q0 = anchored_start(TransformedState(ref, spec, fold=True), TransformedState(mod, spec, fold=True), spec, per_layer, where)
    row["anchored_start"] = s.row
    for name, start in (("identity", None), ("anchored", q0)):
        with Stage() as s:
            fit = residual_descent(ref, mod, spec, per_layer, start=start, max_iter=1, device=where, folded=False)
        row[f"descent_{name}"] = {**s.row, "round_seconds": fit.details["residual"]["round_seconds"],
                                  "fit_seconds": {k: round(v, 1) for k, v in fit.seconds.items()},
                                  "distance": [round(h, 4) for h in fit.history]}
        print(f"{name}: {row[f'descent_{name}']}", flush=True)
    row["total"] = {"wall_s": round(sum(row[k]["wall_s"] for k in STAGES), 1), "cpu_s": round(sum(row[k]["cpu_s"] for k in STAGES), 1),
                    "peak_anon_gb": max(row[k]["peak_anon_gb"] for k in STAGES)}
    return row


def ffn_split(reference: Path, model: Path) -> dict:
    """One FFN layer's fit in its two parts, each on its own clock: the similarity (GEMMs, torch's threads) and the
    LAP (one solver thread): what of the per-layer cost spreads over cores and what does not. The first layer of
    the unrotated pair (a fit inside the descent sees the rotated model: same shapes, same work)."""
    ref_ckpt = open_checkpoint(reference)
    ref, mod = LazyState(ref_ckpt), LazyState(open_checkpoint(model))
    group = spec_for(ref_ckpt.config, ref_ckpt.shapes().keys()).ffn[0]
    with Stage() as s:
        similarity = ffn_group_similarity(StateView(ref), StateView(mod), group)
    row = {"similarity": s.row}
    with Stage() as s:
        solve_ffn(similarity, group.width)
    return {**row, "lap": s.row, "width": group.width, "certified_identity": similarity is None}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(constant, per_layer)`` of ``value = constant + layers × per_layer`` (two points: exact)."""
    if len({n for n, _ in points}) < 2:
        raise SystemExit("projection needs rows at two layer counts at least")
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def later_round(row: dict) -> dict:
    """What a round after the first costs: the identity start's round (the full correlation, its SVD, the
    per-layer fit, the distances) without the descent's initial distance pass. Wall: its ``round_seconds``; CPU:
    the stage's CPU seconds in the same proportion (CPU per round is not recorded apart)."""
    stage = row["descent_identity"]
    wall = stage["round_seconds"][0]
    return {"wall_s": wall, "cpu_s": stage["cpu_s"] * wall / stage["wall_s"]}


def project(rows: dict, layers: int, rounds: int) -> dict:
    """Per stage and measure (wall, CPU): the constant, the per-layer cost and the ``layers``-layer figure; and
    the total for ``rounds`` rounds per start: the measured stages (anchored start, first round of each start,
    the initial distance passes) plus ``rounds - 1`` later rounds (:func:`later_round`) for each of the two starts."""
    out: dict = {}
    derived = {key: {**r, "later_round": later_round(r)} for key, r in rows.items()}
    for stage in (*STAGES, "total", "later_round"):
        for measure_ in ("wall_s", "cpu_s"):
            c, per = fit_line([(r["layers"], r[stage][measure_]) for r in derived.values()])
            out[f"{stage}.{measure_}"] = {"constant": round(c, 2), "per_layer": round(per, 2), f"at_{layers}": round(c + layers * per, 1)}
    for measure_ in ("wall_s", "cpu_s"):
        first = out[f"total.{measure_}"][f"at_{layers}"]
        later = out[f"later_round.{measure_}"][f"at_{layers}"]
        out[f"{rounds}_rounds_per_start.{measure_}"] = round(first + 2 * (rounds - 1) * later, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", nargs="*", type=Path, help="reference and model checkpoint folders")
    parser.add_argument("--symmetries", default="all,residual")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--store", type=Path, default=RESULTS / "residual_round.json")
    parser.add_argument("--project", type=int, default=None, metavar="LAYERS", help="project the stored rows to LAYERS layers")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per start in the projected total")
    parser.add_argument("--rows", default="", help="project only the stored rows whose key starts with this (7b-L)")
    parser.add_argument("--ffn-split", action="store_true", help="time one FFN layer's similarity and LAP apart (of the pair)")
    args = parser.parse_args()
    rows = json.loads(args.store.read_text()) if args.store.exists() else {}
    if args.pair:
        if len(args.pair) != 2:
            raise SystemExit("give two checkpoint folders: reference and model")
        key = args.pair[0].resolve().parent.name
        if args.ffn_split:
            split = ffn_split(args.pair[0], args.pair[1])
            rows.setdefault("ffn_split", {})[key] = split
            print(json.dumps(split, indent=2))
        else:
            rows[key] = measure(args.pair[0], args.pair[1], args.symmetries, args.device)
            print(json.dumps(rows[key], indent=2))
        args.store.write_text(json.dumps(rows, indent=2))
    if args.project is not None:
        measured = {k: r for k, r in rows.items() if k.startswith(args.rows) and k != "ffn_split"}
        print(json.dumps(project(measured, args.project, args.rounds), indent=2))


if __name__ == "__main__":
    main()
