"""Same-base merges of real fine-tunes of all-MiniLM-L6-v2, without and with symmerge alignment.

Data: WordNet supersense classification from the Debian package ``wordnet-base`` (``/usr/share/wordnet``). Each
synset of ``data.noun`` / ``data.verb`` is one example: text ``"{first lemma}: {gloss up to the first ';' or '"'}"``,
label its lexicographer file (nouns: 26 classes, lexnames 3–28; verbs: 15 classes, 29–43; remapped to 0..K-1).
Fixed seeded splits per task: test, validation (only used to pick task arithmetic's λ) and train.

Fine-tunes (``BertForSequenceClassification`` from the packaged MiniLM weights, 1 epoch, batch 32, AdamW lr 1e-4,
linear warm-up/decay, max length 64, dynamic padding), cached under ``.cache/minilm-finetunes/``:

* ``noun-a``: noun task, seed 0, first half of the noun training pool;
* ``verb``: verb task, seed 0;
* ``noun-b``: noun task, seed 1, second half of the noun training pool (a "model soup" partner of ``noun-a``).

Merges of the encoder (``bert.*``; each task keeps its own classifier head; the pretrained MiniLM encoder is the base
of the task vectors) for the pairs (noun-a, verb) and (noun-a, noun-b): linear, task arithmetic (λ 1 and 0.5, λ
picked on validation), TIES (density 0.2, λ 1, per-tensor trim), Fisher (diagonal empirical Fisher of 256 training
examples of each model's own task), RegMean (Grams of the same 256 examples, α 0.9) — each without alignment and
with each fine-tune's encoder aligned to the base (``symmetries="all"``; statistics computed on the aligned models).

    .venv/bin/python benchmarks/fusion_minilm.py [--train 5000 --test 2000 --val 1000] [--threads 2]

Writes ``benchmarks/results/fusion_minilm.{md,json}``; a detailed log (progress bars included) goes to
``benchmarks/results/fusion_minilm.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / ".cache" / "minilm-finetunes"
WORDNET = Path("/usr/share/wordnet")
TASKS = {"noun": (3, 28), "verb": (29, 43)}  # lexicographer file numbers, inclusive
SPLIT_SEED = 1234
STAT_EXAMPLES = 256
LAMBDAS = (1.0, 0.5)

LOG = None


def log(*args) -> None:
    msg = " ".join(str(a) for a in args)
    print(msg, file=LOG, flush=True)


def say(*args) -> None:
    """To the terminal (short) and the log."""
    log(*args)
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------------------- data


def read_wordnet(task: str) -> list[tuple[str, int]]:
    lo, hi = TASKS[task]
    path = WORDNET / f"data.{task}"
    if not path.is_file():
        raise SystemExit(f"{path} missing: apt-get install -y --no-install-recommends wordnet-base")
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            fields = line.split(" ")
            lex = int(fields[1])
            if not lo <= lex <= hi:
                continue
            lemma = re.sub(r"\(.*\)$", "", fields[4]).replace("_", " ")  # adjective markers only occur in data.adj
            gloss = line.split(" | ", 1)[1] if " | " in line else ""
            gloss = re.split(r"[;\"]", gloss, maxsplit=1)[0].strip()
            out.append((f"{lemma}: {gloss}", lex - lo))
    return out


def make_splits(args) -> dict:
    """{task: {split: [(text, label)]}}; noun train = two disjoint halves (train_a, train_b)."""
    rng = random.Random(SPLIT_SEED)
    data = {}
    for task in TASKS:
        rows = read_wordnet(task)
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_train = args.train * (2 if task == "noun" else 1)
        need = args.test + args.val + n_train
        if need > len(rows):
            raise SystemExit(f"{task}: {need} examples requested, {len(rows)} available")
        pick = lambda a, b: [rows[i] for i in order[a:b]]  # noqa: E731
        t, v = args.test, args.test + args.val
        splits = {"test": pick(0, t), "val": pick(t, v)}
        if task == "noun":
            splits["train_a"] = pick(v, v + args.train)
            splits["train_b"] = pick(v + args.train, v + 2 * args.train)
        else:
            splits["train_a"] = pick(v, v + args.train)
        splits["num_labels"] = TASKS[task][1] - TASKS[task][0] + 1
        splits["available"] = len(rows)
        data[task] = splits
    return data


class Encoded:
    """Tokenised examples; batches with dynamic padding."""

    def __init__(self, tokenizer, rows, max_length):
        enc = tokenizer([r[0] for r in rows], truncation=True, max_length=max_length)
        self.ids = enc["input_ids"]
        self.labels = [r[1] for r in rows]

    def __len__(self):
        return len(self.ids)

    def batch(self, idx) -> dict:
        n = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros(len(idx), n, dtype=torch.long)
        mask = torch.zeros(len(idx), n, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[r, : len(self.ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor([self.labels[i] for i in idx])}

    def sorted_batches(self, size):
        order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        return [self.batch(order[i : i + size]) for i in range(0, len(order), size)]


# ------------------------------------------------------------------------------------------------- models


def classifier(num_labels: int):
    from transformers import BertForSequenceClassification

    from symmerge.assets import minilm_path

    return BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


def recipe(args, task, half, seed, n) -> dict:
    return {"version": 1, "task": task, "half": half, "seed": seed, "train_examples": n, "epochs": 1, "batch_size": 32,
            "lr": 1e-4, "weight_decay": 0.01, "warmup": 0.06, "max_length": args.max_length, "split_seed": SPLIT_SEED,
            "test": args.test, "val": args.val, "train_per_model": args.train}


def finetune(name: str, task: str, half: str, seed: int, data: Encoded, num_labels: int, args) -> tuple[dict, dict]:
    """(state dict, meta) of a fine-tune, trained once and cached."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    spec = recipe(args, task, half, seed, len(data))
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out = CACHE / f"{name}-{key}"
    if (out / "model.safetensors").is_file() and (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        say(f"  {name}: cached ({out.name}, trained in {meta['train_seconds']:.0f} s)")
        return load_file(out / "model.safetensors"), meta
    torch.manual_seed(seed)
    model = classifier(num_labels).train()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen).tolist()
    bs = spec["batch_size"]
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec["lr"])
    total, warm = len(batches), max(1, round(spec["warmup"] * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm)))
    start = time.perf_counter()
    losses = []
    for idx in tqdm(batches, desc=f"fine-tune {name}", file=LOG, mininterval=10):
        loss = model(**data.batch(idx)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {**spec, "name": name, "train_seconds": seconds, "loss_first_20": sum(losses[:20]) / len(losses[:20]),
            "loss_last_20": sum(losses[-20:]) / len(losses[-20:]), "steps": total}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    try:
        save_file(state, tmp / "model.safetensors")
        model.config.to_json_file(tmp / "config.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"  {name}: trained in {seconds:.0f} s, loss {meta['loss_first_20']:.2f} -> {meta['loss_last_20']:.2f}")
    return state, meta


def encoder_of(state: dict) -> dict:
    return {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}


def head_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("classifier.")}


class Evaluator:
    """One template classifier per task; evaluates (encoder, head) on a split."""

    def __init__(self, encoded: dict, num_labels: dict):
        self.models = {t: classifier(num_labels[t]).eval() for t in num_labels}
        self.batches = {(t, s): enc.sorted_batches(128) for (t, s), enc in encoded.items()}

    def load(self, task, encoder, head):
        model = self.models[task]
        full = {f"bert.{k}": v for k, v in encoder.items()} | head
        missing, unexpected = model.load_state_dict(full, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model

    @torch.inference_mode()
    def accuracy(self, task, split, encoder, head) -> float:
        model = self.load(task, encoder, head)
        correct = total = 0
        for b in self.batches[(task, split)]:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
        return correct / total

    @torch.inference_mode()
    def logits(self, task, split, encoder, head, n_batches=2):
        model = self.load(task, encoder, head)
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in self.batches[(task, split)][-n_batches:]])


# ---------------------------------------------------------------------------------------------- merging


def merge_encoders(method: str, encoders: list[dict], base: dict, params: dict, stats: list[dict] | None = None) -> dict:
    from symmerge.merge.methods import MERGE_METHODS

    fn = MERGE_METHODS[method].fn
    out = {}
    for key, b in base.items():
        tensors = [e[key] for e in encoders]
        if not b.is_floating_point():
            out[key] = tensors[0].clone()
            continue
        kwargs = dict(params)
        if method == "fisher":
            kwargs["fishers"] = [s[f"bert.{key}"] for s in stats]
        elif method == "regmean" and f"bert.{key}" in stats[0] and b.ndim == 2:
            kwargs["grams"] = [s[f"bert.{key}"] for s in stats]
        out[key] = fn(tensors, base=b, name=key, **kwargs)
    return out


def statistics(kind: str, evaluator: Evaluator, task: str, encoder: dict, head: dict, calib: list[dict]) -> dict:
    from symmerge.merge.statistics import fisher_diagonal, input_grams

    model = evaluator.load(task, encoder, head)
    if kind == "fisher":
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            return fisher_diagonal(model, calib)
        finally:
            model.zero_grad(set_to_none=True)
    return input_grams(model, calib)


def flat_distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(a[k].float() - b[k].float())) ** 2 for k in a if a[k].is_floating_point()))


def flat_norm(a: dict) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(v.float())) ** 2 for v in a.values() if v.is_floating_point()))


def alignment_summary(result, config) -> dict:
    rep = result.report
    neurons = sum(g.details.get("neurons_moved", 0) for g in rep.groups if g.kind == "ffn")
    heads = sum(g.details.get("heads_moved", 0) for g in rep.groups if g.kind == "attention")
    per_layer_heads = [g.details.get("heads_moved", 0) for g in rep.groups if g.kind == "attention"]
    per_layer_neurons = [g.details.get("neurons_moved", 0) for g in rep.groups if g.kind == "ffn"]
    return {"distance_before": rep.distance_before, "distance_after": rep.distance_after, "relative_before": rep.relative_before,
            "relative_after": rep.relative_after, "relative_change": (rep.distance_after - rep.distance_before) / rep.distance_before,
            "neurons_moved": neurons, "neurons_total": config.intermediate_size * sum(g.kind == "ffn" for g in rep.groups),
            "heads_moved": heads, "heads_total": config.num_attention_heads * sum(g.kind == "attention" for g in rep.groups),
            "neurons_moved_per_layer": per_layer_neurons, "heads_moved_per_layer": per_layer_heads,
            "seconds": sum(rep.seconds.values()), **identity_deviation(result.transform)}


def identity_deviation(transform) -> dict:
    """How far the fitted per-head rotations and scales are from the identity (max over heads and layers)."""
    out = {"max_abs_rotation_minus_identity": 0.0, "max_abs_scale_minus_one": 0.0}
    for ht in transform.heads.values():
        for r in (ht.qk_rotation, ht.vo_rotation):
            eye = torch.eye(r.shape[-1], dtype=r.dtype)
            out["max_abs_rotation_minus_identity"] = max(out["max_abs_rotation_minus_identity"], float((r - eye).abs().max()))
        for a in (ht.qk_scale, ht.vo_scale):
            out["max_abs_scale_minus_one"] = max(out["max_abs_scale_minus_one"], float((a - 1).abs().max()))
    return out


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=5000, help="training examples per fine-tune")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    LOG = open(RESULTS / "fusion_minilm.log", "w")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import symmerge
    from symmerge.assets import load_minilm

    t_all = time.perf_counter()
    timing: dict[str, float] = {}
    load_start = os.getloadavg()
    say(f"fusion_minilm: {args.threads} threads, load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")

    # data -------------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    base_model, tokenizer = load_minilm()
    config = base_model.config
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    data = make_splits(args)
    num_labels = {task: data[task]["num_labels"] for task in TASKS}
    enc = {}
    for task in TASKS:
        for split in ("test", "val", "train_a", "train_b"):
            if split in data[task]:
                enc[(task, split)] = Encoded(tokenizer, data[task][split], args.max_length)
    for task in TASKS:
        labels_seen = sorted({r[1] for r in data[task]["train_a"]})
        log(f"{task}: {data[task]['available']} synsets, {len(labels_seen)}/{num_labels[task]} labels in train_a; "
            f"e.g. {data[task]['test'][0]}")
    timing["data"] = time.perf_counter() - t
    loads = {"data": os.getloadavg()}

    # fine-tunes -------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    say("fine-tunes:")
    specs = {"noun-a": ("noun", "train_a", 0), "verb": ("verb", "train_a", 0), "noun-b": ("noun", "train_b", 1)}
    states, metas = {}, {}
    for name, (task, half, seed) in specs.items():
        states[name], metas[name] = finetune(name, task, half, seed, enc[(task, half)], num_labels[task], args)
    encoders = {n: encoder_of(s) for n, s in states.items()}
    heads = {n: head_of(s) for n, s in states.items()}
    task_of = {n: s[0] for n, s in specs.items()}
    assert set(encoders["noun-a"]) == set(base), sorted(set(encoders["noun-a"]) ^ set(base))[:5]
    timing["finetune"] = time.perf_counter() - t
    loads["finetune"] = os.getloadavg()

    evaluator = Evaluator({k: v for k, v in enc.items() if k[1] in ("test", "val")}, num_labels)

    # individual models --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    individual = {}
    for name in specs:
        task = task_of[name]
        individual[name] = {"test": evaluator.accuracy(task, "test", encoders[name], heads[name]),
                            "val": evaluator.accuracy(task, "val", encoders[name], heads[name]),
                            "base_encoder_test": evaluator.accuracy(task, "test", base, heads[name])}
        say(f"  {name}: test {individual[name]['test']:.4f} (base encoder + this head: {individual[name]['base_encoder_test']:.4f})")
    timing["evaluate_individual"] = time.perf_counter() - t
    loads["evaluate_individual"] = os.getloadavg()

    # alignment to the base -------------------------------------------------------------------------------------
    t = time.perf_counter()
    aligned, to_base = {}, {}
    for name in specs:
        result = symmerge.align(base, encoders[name], config=config, symmetries="all", model_name=name)
        aligned[name] = result.state_dict
        to_base[name] = alignment_summary(result, config)
        task = task_of[name]
        diff = float((evaluator.logits(task, "test", encoders[name], heads[name])
                      - evaluator.logits(task, "test", aligned[name], heads[name])).abs().max())
        to_base[name]["max_logit_change"] = diff
        to_base[name]["aligned_test"] = evaluator.accuracy(task, "test", aligned[name], heads[name])
        to_base[name]["task_vector_norm_before"] = flat_distance(encoders[name], base)
        to_base[name]["task_vector_norm_after"] = flat_distance(aligned[name], base)
        say(f"  align {name} -> base: relative {to_base[name]['relative_before']:.5f} -> {to_base[name]['relative_after']:.5f}, "
            f"neurons moved {to_base[name]['neurons_moved']}/{to_base[name]['neurons_total']}, heads moved "
            f"{to_base[name]['heads_moved']}/{to_base[name]['heads_total']}, max |Δlogit| {diff:.2e}")
    timing["align_to_base"] = time.perf_counter() - t
    loads["align_to_base"] = os.getloadavg()

    # statistics (on the models as merged: original or aligned) -----------------------------------------------------
    t = time.perf_counter()
    stats: dict = {}
    for name in specs:
        task, half, _ = specs[name]
        calib = [enc[(task, half)].batch(list(range(i, min(i + 32, STAT_EXAMPLES)))) for i in range(0, STAT_EXAMPLES, 32)]
        for variant, encoder in (("none", encoders[name]), ("all", aligned[name])):
            for kind in ("fisher", "gram"):
                s = time.perf_counter()
                stats[(name, variant, kind)] = statistics(kind, evaluator, task, encoder, heads[name], calib)
                log(f"{kind} {name} ({variant}): {time.perf_counter() - s:.1f} s")
    timing["statistics"] = time.perf_counter() - t
    loads["statistics"] = os.getloadavg()

    # merges ----------------------------------------------------------------------------------------------------
    pairs = {"noun+verb": ("noun-a", "verb"), "noun+noun (soup)": ("noun-a", "noun-b")}
    methods = [("linear", "linear", {}), ("task arithmetic λ=1", "task_arithmetic", {"lambda_": 1.0}),
               ("task arithmetic λ=0.5", "task_arithmetic", {"lambda_": 0.5}), ("TIES d=0.2 λ=1", "ties", {"density": 0.2, "lambda_": 1.0}),
               ("Fisher", "fisher", {}), ("RegMean α=0.9", "regmean", {"alpha": 0.9})]
    t = time.perf_counter()
    rows, pair_info = [], {}
    for pair, (m1, m2) in pairs.items():
        info = {"models": [m1, m2]}
        info["distance_unaligned"] = flat_distance(encoders[m1], encoders[m2])
        info["distance_both_aligned_to_base"] = flat_distance(aligned[m1], aligned[m2])
        info["base_norm"] = flat_norm(base)
        direct = symmerge.align(encoders[m1], encoders[m2], config=config, symmetries="all", model_name=m2)
        info["direct_alignment"] = alignment_summary(direct, config)
        pair_info[pair] = info
        say(f"  {pair}: distance {info['distance_unaligned']:.4f} -> {info['distance_both_aligned_to_base']:.4f} (both aligned to base); "
            f"direct {m2}->{m1}: relative {info['direct_alignment']['relative_before']:.5f} -> {info['direct_alignment']['relative_after']:.5f}, "
            f"neurons {info['direct_alignment']['neurons_moved']}, heads {info['direct_alignment']['heads_moved']}")
        for variant in ("none", "all"):
            models = [encoders[m1], encoders[m2]] if variant == "none" else [aligned[m1], aligned[m2]]
            for label, method, params in methods:
                s = time.perf_counter()
                st = None
                if method == "fisher":
                    st = [stats[(m, variant, "fisher")] for m in (m1, m2)]
                elif method == "regmean":
                    st = [stats[(m, variant, "gram")] for m in (m1, m2)]
                merged = merge_encoders(method, models, base, params, st)
                merge_s = time.perf_counter() - s
                acc = {}
                for m in (m1, m2):
                    acc[m] = {"test": evaluator.accuracy(task_of[m], "test", merged, heads[m])}
                    if method == "task_arithmetic":
                        acc[m]["val"] = evaluator.accuracy(task_of[m], "val", merged, heads[m])
                row = {"pair": pair, "alignment": variant, "method": label, "merge_method": method, "params": params,
                       "accuracy": acc, "mean_test": sum(a["test"] for a in acc.values()) / 2,
                       "distance_to_base": flat_distance(merged, base), "merge_seconds": merge_s,
                       "seconds": time.perf_counter() - s}
                rows.append(row)
                log(f"{pair:<18} {variant:<5} {label:<24} " + "  ".join(f"{m} {a['test']:.4f}" for m, a in acc.items()))
    timing["merge_and_evaluate"] = time.perf_counter() - t
    loads["merge_and_evaluate"] = os.getloadavg()

    # λ of task arithmetic picked on the validation split (mean over the pair's two heads)
    picks = {}
    for pair in pairs:
        for variant in ("none", "all"):
            cands = [r for r in rows if r["pair"] == pair and r["alignment"] == variant and r["merge_method"] == "task_arithmetic"]
            best = max(cands, key=lambda r: sum(a["val"] for a in r["accuracy"].values()))
            picks[(pair, variant)] = best["params"]["lambda_"]
            best["picked_on_val"] = True

    timing["total"] = time.perf_counter() - t_all
    load_end = os.getloadavg()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": args.threads,
               "load_average_start": load_start, "load_average_end": load_end,
               "load_average_after_phase": loads}
    out = {"machine": machine, "timing_seconds": timing, "args": vars(args),
           "data": {t: {"available": data[t]["available"], "num_labels": num_labels[t], "test": len(data[t]["test"]),
                        "val": len(data[t]["val"]), "train_per_model": args.train} for t in TASKS},
           "finetunes": metas, "individual": individual, "alignment_to_base": to_base, "pairs": pair_info,
           "ta_lambda_picked_on_val": {f"{p} / {v}": lam for (p, v), lam in picks.items()}, "merges": rows}
    (RESULTS / "fusion_minilm.json").write_text(json.dumps(out, indent=1))
    md = render(out, pairs, methods)
    (RESULTS / "fusion_minilm.md").write_text(md)
    say(f"done in {timing['total']:.0f} s; wrote {RESULTS / 'fusion_minilm.md'}")
    LOG.close()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def render(out: dict, pairs: dict, methods: list) -> str:
    ind = out["individual"]
    lines = ["# Same-base merges of MiniLM fine-tunes (WordNet supersenses)", ""]
    lines.append("Test accuracy of the merged encoder with each task's own classifier head. `none`: merged as they are; "
                 "`all`: each fine-tune's encoder aligned to the pretrained base first (`symmetries=\"all\"`; Fisher/Gram "
                 "statistics computed on the aligned models). ✓ = task-arithmetic λ picked on the validation split.")
    lines.append("")
    hdr = "| method | align | " + " | ".join(f"{pair}: {m}" for pair, ms in pairs.items() for m in ms) + " | " + \
          " | ".join(f"{pair}: mean" for pair in pairs) + " |"
    lines += [hdr, "|" + "---|" * (2 + 3 * len(pairs))]
    ref = "| individual fine-tune | – | " + " | ".join(f"{ind[m]['test']:.4f}" for ms in pairs.values() for m in ms) + " | " + \
          " | ".join(f"{(ind[ms[0]]['test'] + ind[ms[1]]['test']) / 2:.4f}" for ms in pairs.values()) + " |"
    base = "| pretrained encoder + head | – | " + " | ".join(f"{ind[m]['base_encoder_test']:.4f}" for ms in pairs.values() for m in ms) + \
           " | " + " | ".join(f"{(ind[ms[0]]['base_encoder_test'] + ind[ms[1]]['base_encoder_test']) / 2:.4f}" for ms in pairs.values()) + " |"
    lines += [ref, base]
    for label, _, _ in methods:
        for variant in ("none", "all"):
            cells, means = [], []
            for pair, ms in pairs.items():
                r = next(r for r in out["merges"] if r["pair"] == pair and r["alignment"] == variant and r["method"] == label)
                mark = " ✓" if r.get("picked_on_val") else ""
                cells += [f"{r['accuracy'][m]['test']:.4f}{mark}" for m in ms]
                means.append(f"{r['mean_test']:.4f}")
            lines.append(f"| {label} | {variant} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
    lines += ["", "## Alignment", ""]
    lines.append("| alignment | relative distance before → after | change | FFN neurons moved | heads moved "
                 "| max \\|R − I\\| | max \\|scale − 1\\| | max \\|Δlogit\\| | seconds |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, a in out["alignment_to_base"].items():
        lines.append(f"| {name} → pretrained base | {a['relative_before']:.6f} → {a['relative_after']:.6f} | {100 * a['relative_change']:+.3f}% | "
                     f"{a['neurons_moved']}/{a['neurons_total']} | {a['heads_moved']}/{a['heads_total']} | {a['max_abs_rotation_minus_identity']:.2e} | "
                     f"{a['max_abs_scale_minus_one']:.2e} | {a['max_logit_change']:.1e} | {a['seconds']:.1f} |")
    for pair, info in out["pairs"].items():
        a = info["direct_alignment"]
        m1, m2 = info["models"]
        lines.append(f"| {m2} → {m1} (direct) | {a['relative_before']:.6f} → {a['relative_after']:.6f} | {100 * a['relative_change']:+.3f}% | "
                     f"{a['neurons_moved']}/{a['neurons_total']} | {a['heads_moved']}/{a['heads_total']} | {a['max_abs_rotation_minus_identity']:.2e} | "
                     f"{a['max_abs_scale_minus_one']:.2e} | – | {a['seconds']:.1f} |")
    lines += ["", "| pair | ‖θ₁ − θ₂‖ unaligned | both aligned to base | direct alignment | ‖θ_base‖ |", "|---|---|---|---|---|"]
    for pair, info in out["pairs"].items():
        lines.append(f"| {pair} | {info['distance_unaligned']:.4f} | {info['distance_both_aligned_to_base']:.4f} | "
                     f"{info['direct_alignment']['distance_after']:.4f} | {info['base_norm']:.1f} |")
    m, tm = out["machine"], out["timing_seconds"]
    d = out["data"]
    lines += ["", "## Setup", ""]
    lines.append(f"- Data: WordNet 3.0 (`wordnet-base`) supersenses; noun {d['noun']['num_labels']} classes ({d['noun']['available']} synsets), "
                 f"verb {d['verb']['num_labels']} classes ({d['verb']['available']} synsets); per task {d['noun']['test']} test / "
                 f"{d['noun']['val']} validation; {out['args']['train']} training examples per fine-tune (noun-a and noun-b use disjoint halves).")
    lines.append("- Fine-tunes: " + "; ".join(f"{n} seed {f['seed']}, {f['steps']} steps, loss {f['loss_first_20']:.2f} → {f['loss_last_20']:.2f}, "
                                           f"{f['train_seconds']:.0f} s" for n, f in out["finetunes"].items()) + ".")
    lines.append(f"- Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} with {m['threads']} threads, transformers {m['transformers']}; "
                 f"load average at start {' '.join(f'{x:.2f}' for x in m['load_average_start'])}, at end "
                 f"{' '.join(f'{x:.2f}' for x in m['load_average_end'])}.")
    lines.append("- 1-minute load average after each phase: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in m["load_average_after_phase"].items())
                 + " (other jobs shared this machine: timings are indicative only).")
    cached = " (fine-tunes loaded from the cache; their training times are listed above)" if tm["finetune"] < 30 else ""
    lines.append("- Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in tm.items()) + cached + ".")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes(out, pairs, methods)] + [""]
    return "\n".join(lines)


def notes(out: dict, pairs: dict, methods: list) -> list[str]:
    """Observations computed from the numbers (so a re-run keeps them true)."""
    ind, rows, n_test = out["individual"], out["merges"], out["data"]["noun"]["test"]
    se = 100 * math.sqrt(0.25 / n_test)
    res = []
    a = out["alignment_to_base"]
    moved_n = sum(x["neurons_moved"] for x in a.values()) + sum(p["direct_alignment"]["neurons_moved"] for p in out["pairs"].values())
    moved_h = sum(x["heads_moved"] for x in a.values()) + sum(p["direct_alignment"]["heads_moved"] for p in out["pairs"].values())
    max_r = max([x["max_abs_rotation_minus_identity"] for x in a.values()] + [p["direct_alignment"]["max_abs_rotation_minus_identity"] for p in out["pairs"].values()])
    changes = [100 * x["relative_change"] for x in a.values()] + [100 * p["direct_alignment"]["relative_change"] for p in out["pairs"].values()]
    diffs = []
    for pair, ms in pairs.items():
        for label, _, _ in methods:
            r0 = next(r for r in rows if r["pair"] == pair and r["alignment"] == "none" and r["method"] == label)
            r1 = next(r for r in rows if r["pair"] == pair and r["alignment"] == "all" and r["method"] == label)
            diffs += [abs(r1["accuracy"][m]["test"] - r0["accuracy"][m]["test"]) for m in ms]
    res.append(f"Alignment is ≈ identity for these same-base fine-tunes, as expected: {moved_n} FFN neurons and {moved_h} heads moved in all "
               f"{len(a) + len(out['pairs'])} alignments (to the base and partner to partner); the fitted head rotations/scales differ from the "
               f"identity by at most {max_r:.1e} per entry; the distance changed by {min(changes):+.3f}% to {max(changes):+.3f}% (a small "
               "rotation/rescaling absorbs a sliver of each task vector). Function preserved: max |Δlogit| "
               f"{max(x['max_logit_change'] for x in a.values()):.1e}, aligned test accuracy equal to the original for "
               f"{sum(abs(x['aligned_test'] - ind[n]['test']) < 1e-12 for n, x in a.items())}/{len(a)} fine-tunes.")
    res.append(f"Alignment neither helped nor hurt any merge: the largest accuracy difference between `none` and `all` is "
               f"{100 * max(diffs):.2f} pp ({round(max(diffs) * n_test)} of {n_test} test examples), far below the binomial standard error "
               f"(≈ {se:.1f} pp at 50%). For same-base fine-tunes there is no symmetry to undo; alignment matters for models trained apart.")
    for pair, ms in pairs.items():
        mine = [r for r in rows if r["pair"] == pair]
        best = max(mine, key=lambda r: r["mean_test"])
        ind_mean = (ind[ms[0]]["test"] + ind[ms[1]]["test"]) / 2
        lin = next(r for r in mine if r["merge_method"] == "linear" and r["alignment"] == "none")
        res.append(f"{pair}: individual fine-tunes average {ind_mean:.4f}; linear averaging gives {lin['mean_test']:.4f}; best is "
                   f"{best['method']} ({best['alignment']}) at {best['mean_test']:.4f} (" + ", ".join(f"{m} {best['accuracy'][m]['test']:.4f} vs "
                   f"{ind[m]['test']:.4f} alone" for m in ms) + ").")
    res.append(f"Resolution: each accuracy is on {n_test} test examples, so differences under ≈ 2 standard errors (≈ {2 * se:.0f} pp) "
               "between rows, or between a merge and an individual model, are not meaningful.")
    res.append("Task arithmetic with λ = 0.5 is exactly linear averaging for two models (base + ½(τ₁ + τ₂) = ½(θ₁ + θ₂)), so those rows "
               "coincide by construction. The validation split picked λ = " + ", ".join(f"{v} ({k})" for k, v in out["ta_lambda_picked_on_val"].items()) + ".")
    res.append("Method details: TIES trims each tensor's task vector to its top 20% (`trim=tensor`, not the paper's whole-model trim); Fisher "
               "is the empirical diagonal Fisher (true labels, per-example gradients, unnormalised); RegMean Grams count real tokens only, "
               "and non-linear tensors (embeddings, LayerNorms, biases) are averaged. Only `bert.*` tensors are merged; the pooler is part "
               "of the merged encoder.")
    return res


if __name__ == "__main__":
    main()
