"""The ``symmerge`` command.

Bad input never produces a traceback: :func:`main` turns :class:`SymmergeError` into ``error: <message>`` on one
line and exit code 2. Set ``SYMMERGE_DEBUG=1`` to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from symmerge.allocator import keep_freed_buffers
from symmerge.errors import SymmergeError

app = typer.Typer(
    name="symmerge",
    help="Align transformer checkpoints through the symmetries of their parameter space, then merge them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from symmerge._version import __version__

        typer.echo(f"symmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Options before the command (`symmerge --version`)."""


SYMMETRIES_HELP = (
    "Comma-separated symmetry classes to align: ffn (FFN neuron permutation), qk / vo (per-head rotations), "
    "scale (per-head rescaling), heads (head permutation), residual (residual-stream map, norms folded first); "
    "all (= every per-layer class, without residual) / none / auto (default for align and merge: all,residual for pre-LN "
    "and RMSNorm families, all elsewhere; align falls back to all when the map lowers the weight distance < 5%, and fine-tunes of one base skip the map). "
    "Example: all,residual."
)

SETTINGS_HELP = (
    "The symmetry classes of one alignment setting (as for align), repeatable: none, all, ffn, qk,vo, all,residual...; "
    "auto (per family, as align's default); prefix act: for activation matching or learn: for learned matching on the calibration "
    "data; suffix +repair to REPAIR the path (default: none and all)."
)


MAX_SEED = 2**64 - 1
"""The largest seed torch's generators take (``manual_seed`` seeds are 0 … 2⁶⁴ − 1): a negative one would be wrapped
silently (and name a cache folder ``seed-1``), a larger one fails deep inside torch."""

MAX_SECONDS_HELP = (
    "Time budget per model for the residual coordinate descent (-s ...,residual): a round starts only if it is expected "
    "to end within the budget; the best element found so far is kept. Default: no budget."
)


DEVICE_HELP = (
    "Where the matching math runs (similarity GEMMs, SVDs, quartics, residual statistics, activation/learned matching): "
    "cpu, cuda, or auto (cuda when available). The LAPs always run on the CPU."
)


RAY_HELP = (
    "Fit the per-layer alignments as Ray tasks (pip install 'symmerge[ray]'): auto (the cluster this machine joined "
    "with `ray start`), HOST:6379 (a cluster's head) or local (a Ray instance started here). The checkpoints must be "
    "on a path every node can read. Same result as without."
)


def _executor(address: Optional[str]):
    """A Ray executor for ``--ray ADDRESS`` (``None`` without it); imports Ray only when asked for."""
    if address is None:
        return None
    from symmerge.match.distributed import RayExecutor

    return RayExecutor(address)


@contextmanager
def _collection_paused():
    """Python's cyclic garbage collector paused (for a command's imports): importing torch creates ~270k objects
    that all stay alive, and the collector ran ~400 times over them, 0.3 of the ~2.3 CPU s of ``align``'s imports
    (measured with ``gc.callbacks`` on BERT-base); it is on again, as the caller had it, once they are imported."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def echo(msg: str = "") -> None:
    typer.echo(msg)


@app.command()
def align(
    reference: Annotated[Path, typer.Argument(help="Reference model directory (config.json + safetensors): the basis everything is aligned to.")],
    models: Annotated[list[Path], typer.Argument(help="One or more model directories to align to the reference.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory; each aligned model is written to OUT/<model name>/.")],
    symmetries: Annotated[str, typer.Option("--symmetries", "-s", help=SYMMETRIES_HELP)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights (unpickling can run code: only for files you trust).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no per-group table.")] = False,
    match: Annotated[str, typer.Option("--match", help="weights (data-free), activations or learned (both need --data).")] = "weights",
    learn_steps: Annotated[int, typer.Option("--learn-steps", min=1, help="Steps of learned matching.")] = 200,
    learn_seconds: Annotated[Optional[float], typer.Option("--learn-seconds", min=1, help="Learned matching time budget, s.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Calibration data for --match activations|learned: zoo, a text file or an .npz.")] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", min=0, help=MAX_SECONDS_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "cpu",
    ray: Annotated[Optional[str], typer.Option("--ray", help=RAY_HELP)] = None,
) -> None:
    """Align MODELS to REFERENCE without changing what they compute, and write them as HF directories.

    With the residual class, norms are folded to find the map and unfolded again with the reference's own norm
    gains, so every aligned model lives in the reference's parametrisation: average it with REFERENCE itself.
    (A tied LM head becomes untied. Only a reference with a zero norm gain forces folded outputs; then the folded
    reference is written to OUT/reference-folded/ to merge with.)
    """
    with _collection_paused():
        from symmerge.alignment import align as align_models
        from symmerge.groups import is_auto, parse_symmetries, resolve_symmetries
        from symmerge.io import atomic_output_dir, check_output_dir, load_state_dict, open_checkpoint, unique_names
        from symmerge.io.stream import STREAMED_SHARD_BYTES, LazyState, ShardWriter
        from symmerge.match import resolve_device
        from symmerge.spec import (
            check_compatible_shapes,
            check_embeddable,
            check_same_shape,
            lent_head,
            resized_keys,
            spec_for,
            untied_head,
            widths_differ,
        )

    auto = is_auto(symmetries)
    chosen = None if auto else parse_symmetries(symmetries)
    inputs = [reference, *models, data if data is not None and Path(data).exists() else None]
    check_output_dir(out, force, inputs)  # before any work: never an input, never something that is not ours
    executor = _executor(ray)
    resolved = resolve_device(device) if executor is None else executor.resolve_device(device)
    # Validate every input (files, configs, shapes) before reading any weight.
    ref_ckpt = open_checkpoint(reference, allow_pickle)
    ckpts = [open_checkpoint(m, allow_pickle) for m in models]
    ref_spec = spec_for(ref_ckpt.config, ref_ckpt.shapes().keys())
    chosen = resolve_symmetries(symmetries, ref_spec) if auto else chosen
    specs = [spec_for(ckpt.config, ckpt.shapes().keys()) for ckpt in ckpts]
    # tied models beside untied ones (either the reference or another): a tied one's embedding stands in for its
    # head, as in merge, and its aligned copy is written untied (it holds the head)
    lend = lent_head([(ref_spec, ref_ckpt.shapes().keys()), *((own, c.shapes().keys()) for own, c in zip(specs, ckpts))])

    def shapes(ckpt):
        return _with_lent_head(dict(ckpt.shapes()), lend)

    own_specs = []
    for ckpt, own in zip(ckpts, specs):
        narrower = widths_differ(ref_spec, own)
        (check_embeddable if narrower else check_same_shape)(ref_spec, own, str(ckpt.path))
        check_compatible_shapes(shapes(ref_ckpt), shapes(ckpt), str(ckpt.path), untied_head(ref_spec, chosen),
                                resized_keys(ref_spec, own) if narrower else frozenset())
        own_specs.append(own if narrower else None)

    calibration = _calibration(match, data, ref_ckpt)

    def read(ckpt):
        """Weight matching streams from mmap (bounded memory: the aligned model is computed unit by unit as it is
        written; Ray tasks read the files themselves); data-driven matchers run the models on whole state dicts."""
        if match == "weights":
            return LazyState(ckpt, dict([lend]) if lend else None)
        return _with_lent_head(load_state_dict(ckpt, file_backed=executor is not None), lend)

    ref_state = read(ref_ckpt)
    rows, reports, kept = [], {}, set()
    with atomic_output_dir(out, force, inputs) as tmp:
        for ckpt, name, own in zip(ckpts, unique_names([c.path for c in ckpts]), own_specs):
            start = time.perf_counter()
            state = read(ckpt)
            dest = tmp / name
            dest.mkdir()
            # a memory-mapped model of the reference's widths is aligned lazily: its tensors are written as the
            # report measures them (each computed once for both), the stream save_streamed would write
            writer = ShardWriter(dest, STREAMED_SHARD_BYTES) if isinstance(state, LazyState) and own is None else None
            result = align_models(ref_state, state, symmetries=symmetries if auto else chosen, config=ref_ckpt.config, spec=ref_spec,
                                  progress=not quiet, model_name=name, match=match, calibration=calibration, learn_steps=learn_steps,
                                  learn_seconds=learn_seconds, max_seconds=max_seconds, device=resolved, ray=executor,
                                  model_spec=own, sink=writer)
            write_start = time.perf_counter()
            if writer is not None:  # the tensors' bytes went out in the report's pass ("report" seconds); this closes the shards
                writer.close()
            else:
                write_weights(result.state_dict, dest)
            # a narrower model comes back at the reference's widths: it takes the reference's config (sizes)
            write_model_files(ckpt if own is None else ref_ckpt, dest, untie=result.folded_reference is not None or lend is not None)
            if result.folded and not (tmp / "reference-folded").exists():
                # a reference with a zero norm gain cannot lend its gains: the aligned models stay folded, and
                # the folded reference is what to merge them with
                write_model(result.folded_reference, ref_ckpt, tmp / "reference-folded", untie=True)
            # plus the pass that fed the writer, where it was not the report's (alignment._fed)
            result.report.seconds["write"] = result.report.seconds.get("write", 0.0) + time.perf_counter() - write_start
            r = result.report
            rows.append((name, r.distance_before, r.distance_after, r.relative_before, r.relative_after, time.perf_counter() - start))
            reports[name] = _report_json(ckpt.path, r)
            kept |= set(r.symmetries)
            if not quiet:
                echo(f"\n{name}:\n{r.table()}")
        (tmp / "alignment.json").write_text(json.dumps(
            {"reference": str(ref_ckpt.path.resolve()), "family": ref_spec.family, "symmetries": sorted(kept if auto else chosen),
             **({"requested": "auto"} if auto else {}), "models": reports},
            indent=2,
        ))
    shown = ','.join(sorted(kept if auto else chosen)) or 'none'
    echo(f"\naligned to {ref_ckpt.path} ({ref_spec.family}, symmetries: {'auto → ' if auto else ''}{shown})")
    echo(f"{'model':<28} {'distance before':>16} {'→ after':>12} {'relative':>20} {'seconds':>8}")
    for name, before, after, rel_before, rel_after, secs in rows:
        echo(f"{name:<28} {before:>16.5g} {after:>12.5g} {f'{rel_before:.4g} → {rel_after:.4g}':>20} {secs:>8.2f}")
    echo(f"written to {out}/")


def _calibration(match: str, data: Optional[str], ckpt) -> Optional[list]:
    """Calibration batches for a data-driven matcher (``None`` for weight matching), or a one-line error."""
    from symmerge.data import load_calibration
    from symmerge.io.hf import model_input_name
    from symmerge.match import get_matcher

    get_matcher(match)
    if match == "weights":
        return None
    if data is None:
        raise SymmergeError(f"--match {match} needs --data (zoo, a text file or an .npz)")
    return load_calibration(data, model_dir=ckpt.path, main_input_name=model_input_name(ckpt.config), labels=match == "learned")


def _lend_head(ref_ckpt, a: dict, ckpt, b: dict) -> bool:
    """Where one of two loaded models ties its LM head and the other stores its own, give the tied one its
    embedding as its head (in place), as merge and align do (:func:`symmerge.spec.lent_head`); whether it did."""
    from symmerge.errors import SymmergeError
    from symmerge.spec import lent_head, spec_for

    try:
        lend = lent_head([(spec_for(ref_ckpt.config, a.keys()), a.keys()), (spec_for(ckpt.config, b.keys()), b.keys())])
    except SymmergeError:  # a family symmerge has no spec of (barrier -s none): no tied pair it knows of
        return False
    for state in (a, b):
        _with_lent_head(state, lend)
    return lend is not None


def _with_lent_head(mapping: dict, lend: tuple[str, str] | None) -> dict:
    """``mapping`` (tensors or shapes) given, in place, its embedding's entry as its head where it ties the head
    (``lend``: :func:`symmerge.spec.lent_head`'s ``(head, embedding)``); the same dict, so a
    :class:`~symmerge.io.checkpoint.FileBackedState` stays one."""
    if lend is not None and lend[0] not in mapping and lend[1] in mapping:
        mapping[lend[0]] = mapping[lend[1]]
    return mapping


def write_model(state, source, dest: Path, untie: bool = False) -> None:
    """An HF directory: weights, plus config and tokenizer files from ``source`` (config dtype and tied head as written)."""
    dest.mkdir()
    write_weights(state, dest)
    write_model_files(source, dest, untie)


def write_weights(state, dest: Path) -> None:
    """``state``'s tensors as safetensors in ``dest``."""
    from symmerge.io import save_state_dict
    from symmerge.io.stream import save_streamed

    if isinstance(state, dict):
        save_state_dict(state, dest)
    else:  # computed unit by unit as it is written (a memory-mapped model aligned lazily)
        save_streamed(state, dest)


def write_model_files(source, dest: Path, untie: bool = False) -> None:
    """Config and tokenizer files from ``source`` next to the weights in ``dest`` (config dtype and tied head as written)."""
    from symmerge.io import copy_model_files
    from symmerge.io.stream import write_config

    copy_model_files(source.path, dest)
    write_config(source.config, dest, None, untie=untie)


def _report_json(path: Path, r) -> dict:
    return {
        "path": str(path.resolve()),
        "distance_before": r.distance_before,
        "distance_after": r.distance_after,
        "relative_before": r.relative_before,
        "relative_after": r.relative_after,
        "seconds": r.seconds,
        **({"near_identity": r.matching["near_identity"]} if "near_identity" in r.matching else {}),
        "groups": [vars(g) for g in r.groups],
    }


def _parse_params(items: list[str]) -> dict:
    import yaml

    from symmerge.errors import cut, shorten
    from symmerge.merge.recipe import _BoundedLoader

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SymmergeError(f"--param takes KEY=VALUE, got {shorten(item)}")
        try:
            params[key.strip()] = yaml.load(value, Loader=_BoundedLoader)  # noqa: S506 - a bounded SafeLoader
        except (yaml.YAMLError, ValueError, RecursionError):
            raise SymmergeError(f"--param {cut(key.strip(), 40)}: {shorten(value)} is not a value (a number, true/false or a word)") from None
    return params


@app.command()
def merge(
    inputs: Annotated[list[Path], typer.Argument(
        help="A recipe (.yaml) and, as mergekit-yaml takes it, the output directory — or the model directories to merge (short form).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (an HF model directory).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Short form: merge method (see `symmerge methods`).")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Short form: base model (task_arithmetic, ties, dare_*).")] = None,
    align_: Annotated[str, typer.Option("--symmetries", "-s", "--align", help="Short form: " + SYMMETRIES_HELP)] = "auto",
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Short form: the model everything is aligned to (default: the "
                                                      "base for methods that use one, else the first model; the widest across widths).")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Short form: comma-separated per-model weights.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Short form: method parameter KEY=VALUE (repeatable).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Short form: calibration data for fisher/regmean and for --match activations|learned (.txt or .npz; zoo for matching).")] = None,
    match: Annotated[str, typer.Option("--match", help="Short form: how alignment is found: weights (data-free), activations or learned (need --data).")] = "weights",
    learn_steps: Annotated[int, typer.Option("--learn-steps", min=1, help="Short form: steps of learned matching.")] = 200,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", min=0, help="Short form: " + MAX_SECONDS_HELP)] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help=DEVICE_HELP + " Overrides a recipe's alignment.device.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help=RAY_HELP + " Also with a recipe.")] = None,
    learn_seconds: Annotated[Optional[float], typer.Option("--learn-seconds", min=1, help="Short form: learned matching time budget, s.")] = None,
    iterative: Annotated[bool, typer.Option("--iterative/--star", help="Short form, 3+ models: align each to the mean of the others in rounds.")] = False,
    unmatched: Annotated[str, typer.Option("--unmatched", help=(
        "Short form, models of different widths: mean (a neuron or head only wider models have is averaged over those "
        "models), inputs (its input side is; its output is scaled by their weight) or zero (narrower models count as "
        "zeros there).")) ] = "mean",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Output dtype: float32, bfloat16 or float16 (default: the reference's).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest output shard in bytes: 2GB, 500M, 1GiB, or mergekit's 5B (5 billion); 0: one shard.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights (only files you trust).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="mergekit's: copy the tokenizer files (symmerge always does).")] = True,
    lazy_unpickle: Annotated[bool, typer.Option("--lazy-unpickle", help="mergekit's: accepted; safetensors are read by mmap anyway.")] = False,
    out_shard_size: Annotated[Optional[str], typer.Option("--out-shard-size", help="mergekit's --shard-size, read as mergekit reads it (5B: 5·10⁹ B).")] = None,
    cuda: Annotated[bool, typer.Option("--cuda", help="mergekit's: accepted; symmerge merges on the CPU.")] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help="mergekit's: accepted; symmerge checks shapes, not architecture names.")] = False,
    random_seed: Annotated[Optional[int], typer.Option("--random-seed", help="Seed of random methods (dare_*, della*) unless the recipe sets seed.")] = None,
    write_model_card: Annotated[bool, typer.Option("--write-model-card/--no-write-model-card", help="mergekit's: a README.md (always written).")] = True,
) -> None:
    """Align, then merge models: from a YAML recipe (`symmerge merge RECIPE OUT`, as mergekit-yaml), or the short
    form `symmerge merge A B --method ties --base BASE -o OUT`."""
    from symmerge.io import check_output_dir
    from symmerge.merge.engine import run_merge
    from symmerge.merge.planner import plan_merge
    from symmerge.merge.recipe import load_recipe, parse_size, recipe_from_models

    start = time.perf_counter()
    recipe_given = len(inputs) in (1, 2) and inputs[0].suffix in (".yaml", ".yml")
    if recipe_given and len(inputs) == 2:
        if out is not None and out != inputs[1]:
            raise SymmergeError(f"two outputs given: {inputs[1]} and --out {out}")
        out = inputs[1]
    if out is None:
        raise SymmergeError("no output directory: give it after the recipe (symmerge merge RECIPE OUT) or as --out")
    notes = []
    size_given = None  # --shard-size or mergekit's --out-shard-size, read alike (parse_size: 5B is 5 billion bytes)
    if out_shard_size is not None:
        if shard_size != "2GB" and parse_size(shard_size) != parse_size(out_shard_size):
            raise SymmergeError(f"--shard-size {shard_size} and --out-shard-size {out_shard_size} disagree: give one")
        shard_size = size_given = out_shard_size
    elif shard_size != "2GB":
        size_given = shard_size
    if size_given is not None:
        parse_size(size_given)  # a one-line error now, before any model is opened
    if cuda:
        notes.append("--cuda: symmerge merges on the CPU (streaming, one tensor group at a time); the flag changes nothing")
    if lazy_unpickle:
        notes.append("--lazy-unpickle: safetensors are memory-mapped and read lazily anyway; pickle weights need --allow-pickle")
    if allow_crimes:
        notes.append("--allow-crimes: symmerge checks tensor shapes, not architecture names; the flag changes nothing")
    if not copy_tokenizer:
        notes.append("--no-copy-tokenizer: the tokenizer files are still copied (an output is a complete model directory)")
    if not write_model_card:
        notes.append("--no-write-model-card: the model card is still written (it records the alignment)")
    if not recipe_given:  # a recipe's own paths are known once it is read: it is checked below, still before any work
        check_output_dir(out, force, [*inputs, base, reference, data])
    if recipe_given:
        given = [name for name, value in (("--method", method), ("--base", base), ("--reference", reference), ("--weights", weights),
                                          ("--param", param), ("--data", data), ("--dtype", dtype),
                                          ("--match", match if match != "weights" else None),
                                          ("--max-seconds", max_seconds is not None), ("--iterative", iterative),
                                          ("--unmatched", unmatched if unmatched != "mean" else None)) if value]
        if given:
            raise SymmergeError(f"{', '.join(given)} cannot be combined with a recipe: put them in {inputs[0]}")
        recipe, root = load_recipe(inputs[0])
        if device is not None and recipe.alignment != "none":  # where it runs, not what it computes: may override
            recipe.alignment = recipe.alignment.model_copy(update={"device": device})
        if size_given is not None:
            recipe.shard_size = size_given
    else:
        if method is None:
            raise SymmergeError("give a recipe (.yaml), or models plus --method (see `symmerge methods`)")
        from symmerge.errors import shorten

        try:
            # "" is a slip (an unset shell variable), as -s "" is, not a request for the default weights
            weight_list = [float(w) for w in weights.split(",")] if weights is not None else None
        except ValueError:
            raise SymmergeError(f"--weights takes comma-separated numbers, got {shorten(weights)}") from None
        if weight_list is not None and not all(math.isfinite(w) for w in weight_list):
            raise SymmergeError(f"--weights takes finite numbers, got {shorten(weights)}")
        recipe, root = recipe_from_models(
            [str(p) for p in inputs], method, base=str(base) if base else None, weights=weight_list,
            params=_parse_params(param or []), align=align_, reference=str(reference) if reference else None,
            data=str(data) if data else None, dtype=dtype, shard_size=shard_size, match=match, learn_steps=learn_steps,
            max_seconds=max_seconds, device=device or "cpu", learn_seconds=learn_seconds, iterative=iterative,
            unmatched=unmatched,
        ), None
    plan = plan_merge(recipe, root, allow_pickle)
    if random_seed is not None:
        if any(p.name == "seed" for p in plan.method.params) and "seed" not in recipe.parameters:
            plan.params["seed"] = random_seed
        elif not any(p.name == "seed" for p in plan.method.params):
            notes.append(f"--random-seed: {plan.method.name} draws nothing at random; the seed changes nothing")
    for note in notes + plan.notes:
        echo(f"note: {note}")
    check_output_dir(out, force, [c.path for c in plan.models] + [plan.base.path if plan.base else None, plan.data_path,
                                                                  inputs[0] if recipe_given else None])
    executor = _executor(ray) if plan.aligned else None
    validate_seconds = time.perf_counter() - start
    result = run_merge(plan, out, force=force, progress=not quiet, executor=executor)
    seconds = {"validate": validate_seconds, **result.seconds}
    align_note = f"aligned ({','.join(sorted(plan.symmetries))})" if plan.aligned else "no alignment"
    echo(f"merged {len(plan.models)} models with {plan.method.name}, {align_note} -> {out}/")
    for name, d in result.alignment.items():
        if d.get("identity"):
            echo(f"  {name:<28} alignment: identity (already in the reference's basis; distance {d['distance_before']:.5g})")
        else:
            echo(f"  {name:<28} distance to reference {d['distance_before']:.5g} -> {d['distance_after']:.5g}")
    width = max(len(stage) for stage in seconds)  # merge+write is 11 characters
    echo(f"{'stage':<{width}} {'seconds':>7}")
    for stage, secs in seconds.items():
        echo(f"{stage:<{width}} {secs:>7.2f}")
    echo(f"{'total':<{width}} {sum(seconds.values()):>7.2f}")


@app.command()
def barrier(
    reference: Annotated[Path, typer.Argument(help="Model A (the reference end of the path).")],
    model: Annotated[Path, typer.Argument(help="Model B (aligned to A before interpolating, per setting).")],
    align_: Annotated[Optional[list[str]], typer.Option("--symmetries", "-s", "--align", help=SETTINGS_HELP)] = None,
    data: Annotated[str, typer.Option("--data", help="zoo (the zoo model's own held-out data), a text file (LM) or an .npz (inputs [+ labels]).")] = "zoo",
    points: Annotated[int, typer.Option("--points", min=3, max=1001, help="Number of t values in [0, 1].")] = 11,
    plot: Annotated[Path, typer.Option("--plot", help="PNG with one curve per setting.")] = Path("barrier.png"),
    landscape_: Annotated[Optional[Path], typer.Option(
        "--landscape", help="Also write the 2-D loss landscape through A, B and B' (the last setting) to this PNG.")] = None,
    grid: Annotated[int, typer.Option("--grid", min=3, max=201, help="Landscape grid size.")] = 9,
    learn_steps: Annotated[int, typer.Option("--learn-steps", min=1, help="Steps of learned matching (learn: settings).")] = 200,
    repair: Annotated[bool, typer.Option("--repair", help="Also show each setting with the path REPAIRed (FFN statistics reset on --data).")] = False,
    learn_seconds: Annotated[Optional[float], typer.Option("--learn-seconds", min=1, help="Learned matching time budget, s.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the numbers as JSON.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Loss along θ(t) = (1−t)·A + t·B' for each alignment setting: the loss barrier and the midpoint scores."""
    from symmerge.data import load_calibration
    from symmerge.evaluate import landscape, make_evaluator, run_study
    from symmerge.evaluate.plots import check_plot_path, plot_curves, plot_landscape
    from symmerge.io import load_state_dict, open_checkpoint
    from symmerge.io.hf import model_input_name, untied_config
    from symmerge.io.output import atomic_output_file, check_output_file
    from symmerge.spec import check_compatible

    settings = align_ or ["none", "all"]
    if repair:
        settings = [x for s in settings for x in (s, s + "+repair")]
    inputs = [reference, model, data if data != "zoo" else None]
    for option, path in (("--plot", plot), ("--landscape", landscape_), ("--json", json_out)):
        if path is not None:  # before any work: never an input, always a file that can be written
            check_output_file(path, option, inputs)
            if option != "--json":
                check_plot_path(path, option)
    ref_ckpt, ckpt = open_checkpoint(reference, allow_pickle), open_checkpoint(model, allow_pickle)
    evaluate = make_evaluator(data, ref_ckpt.path)
    a, b = load_state_dict(ref_ckpt), load_state_dict(ckpt)
    # both then hold a head: the models the path is evaluated on are built untied
    config = untied_config(ref_ckpt.config) if _lend_head(ref_ckpt, a, ckpt, b) else ref_ckpt.config
    check_compatible(a, b, str(ckpt.path), reference_name=str(ref_ckpt.path))
    calibration = None
    if any(x.startswith(("act:", "learn:")) or x.endswith("+repair") for x in settings):
        calibration = load_calibration(data, model_dir=ref_ckpt.path, main_input_name=model_input_name(ref_ckpt.config),
                                       labels=any(x.startswith("learn:") for x in settings))
    study = run_study(a, b, config, settings, evaluate, points=points, progress=not quiet, calibration=calibration,
                      learn_steps=learn_steps, learn_seconds=learn_seconds)
    echo(f"A = {ref_ckpt.path}, B = {ckpt.path}, data: {data}, {points} points")
    echo(study.table())
    with atomic_output_file(plot, "--plot") as tmp:
        plot_curves([s.curve for s in study.settings], tmp, title=f"{ref_ckpt.name} vs {ckpt.name}")
    echo(f"plot: {plot}")
    if landscape_ is not None:
        last = study.settings[-1]
        us, vs, losses, marks = landscape(last, b, config, evaluate, grid=grid, progress=not quiet)
        with atomic_output_file(landscape_, "--landscape") as tmp:
            plot_landscape(us, vs, losses, marks, tmp, title=f"loss landscape (B' aligned with {last.label})")
        echo(f"landscape: {landscape_}")
    if json_out is not None:
        with atomic_output_file(json_out, "--json") as tmp:
            tmp.write_text(json.dumps({"reference": str(ref_ckpt.path), "model": str(ckpt.path), "data": data, "rows": study.rows(),
                                       "curves": {s.label: {"t": s.curve.ts, "metrics": s.curve.metrics} for s in study.settings}}, indent=2))


@app.command()
def distance(
    reference: Annotated[Path, typer.Argument(help="Model A.")],
    model: Annotated[Path, typer.Argument(help="Model B.")],
    align_: Annotated[str, typer.Option("--symmetries", "-s", "--align", help=SYMMETRIES_HELP)] = "all",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights.")] = False,
) -> None:
    """Parameter distance between two models, total and per group (embeddings, attention, FFN, norms, head), before
    and after aligning B to A."""
    from symmerge.alignment import align as align_models
    from symmerge.evaluate import grouped_distance
    from symmerge.io import load_state_dict, open_checkpoint
    from symmerge.spec import check_compatible, spec_for

    ref_ckpt, ckpt = open_checkpoint(reference, allow_pickle), open_checkpoint(model, allow_pickle)
    a, b = load_state_dict(ref_ckpt), load_state_dict(ckpt)
    # a tied model beside an untied one: its embedding stands in for its head, as in merge and align
    _lend_head(ref_ckpt, a, ckpt, b)
    check_compatible(a, b, str(ckpt.path), reference_name=str(ref_ckpt.path))
    spec = spec_for(ref_ckpt.config, a.keys())
    result = align_models(a, b, spec=spec, symmetries=align_)
    before = grouped_distance(b, a, spec)
    after = grouped_distance(result.state_dict, result.merge_partner or a, spec)
    echo(f"{'group':<12} {'before':>12} {'after':>12} {'change':>8}")
    for group in before:
        change = (after.get(group, 0.0) - before[group]) / before[group] if before[group] else 0.0
        echo(f"{group:<12} {before[group]:>12.5g} {after.get(group, 0.0):>12.5g} {change:>+8.1%}")
    echo(f"aligned with {','.join(result.report.symmetries) or 'none'}; relative distance {result.report.relative_before:.4g} -> {result.report.relative_after:.4g}")


@app.command()
def zoo(
    name: Annotated[str, typer.Argument(help="Zoo entry such as vit-digits, or 'list' to name them all with what each is.")],
    seed: Annotated[Optional[list[int]], typer.Option("--seed", min=0, max=MAX_SEED, help="Seed(s) to build (repeatable; default 0 and 1).")] = None,
) -> None:
    """Train (or reuse from .cache/zoo/, or $SYMMERGE_CACHE/zoo/) the small models the benchmarks measure, from data shipped in packages."""
    from symmerge.zoo import ZOO, build

    if name == "list":
        width = max(len(key) for key in ZOO)
        for key, entry in ZOO.items():
            echo(f"{key:<{width}} {entry.description}")
        return
    if name not in ZOO:
        raise SymmergeError(f"unknown zoo entry {name!r}; available: {', '.join(ZOO)}")
    for s in seed or [0, 1]:
        echo(str(build(name, s)))


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from symmerge.merge.methods import list_methods

    for m in list_methods():
        needs = [w for w, flag in (("base_model", m.needs_base), ("base_model (optional)", m.optional_base), ("data", m.needs_data)) if flag]
        params = ", ".join(f"{p.name}={'(required)' if p.required else repr(p.default)}{'*' if p.per_model else ''}" for p in m.params) or "-"
        echo(f"{m.name:<18} {m.description}")
        echo(f"{'':<18} parameters: {params}" + (f"; needs: {', '.join(needs)}" if needs else ""))
    echo("* may be given per model (under a model's parameters, or as a list with one value per model)")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Model directory (config.json + safetensors).")],
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights.")] = False,
) -> None:
    """Print a model's family, the symmetry groups symmerge finds in it, and its parameter count."""
    from symmerge.errors import UnsupportedFamily
    from symmerge.io import open_checkpoint
    from symmerge.spec import spec_for
    from symmerge.spec.families import model_type

    ckpt = open_checkpoint(model, allow_pickle)
    try:
        spec = spec_for(ckpt.config, ckpt.shapes().keys())
    except UnsupportedFamily as e:  # the README sends users here to learn whether a model aligns: say so, and what still works
        echo(f"{ckpt.path}: {model_type(ckpt.config)}, {ckpt.num_parameters():,} parameters in {len(ckpt.shapes())} tensors")
        echo(f"no symmetry groups: {e}")
        echo("align refuses it; merge merges it without alignment (by default, or with -s none / alignment: none)")
        return
    touched = spec.touched_keys()
    untouched = [k for k in ckpt.shapes() if k not in touched]
    echo(f"{ckpt.path}: {spec.family}, {ckpt.num_parameters():,} parameters in {len(ckpt.shapes())} tensors")
    for line in spec.describe():
        echo(line)
    echo(f"tensors touched by some group: {len(touched)}; left as they are: {len(untouched)} (embeddings, norms, heads...)")


@app.command()
def demo(
    minilm: Annotated[bool, typer.Option("--minilm", help="Instead: scramble the packaged all-MiniLM-L6-v2 and recover it exactly.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where the plot and numbers go (default: symmerge-demo; not with --minilm, "
                                                "which writes nothing).")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, max=MAX_SEED, help="--minilm only: seed of the random symmetry element (default: 0).")] = None,
) -> None:
    """Two ViTs trained here from different seeds: align B to A with growing sets of symmetries, then print the loss
    barrier of averaging them and plot the path. (--minilm: scramble a real pretrained BERT and recover it.)"""
    from symmerge.demo import run_minilm_demo, run_vit_demo

    # each option belongs to one demo: given to the other, it would be ignored without a word
    if minilm and out is not None:
        raise SymmergeError("--out: the --minilm demo writes no files (it prints its table); drop --out")
    if not minilm and seed is not None:
        raise SymmergeError("--seed is the seed of --minilm's random symmetry element; the ViT demo trains the zoo's seeds 0 and 1")
    if minilm:
        run_minilm_demo(seed=seed or 0, echo=echo)
    else:
        run_vit_demo(out=out or Path("symmerge-demo"), echo=echo)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is so that cleanup (``finally``, temporary folders) runs.

    A BaseException of its own, not KeyboardInterrupt: the CLI framework would turn that into an exit code that
    reads like success.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_RECEIVED: list[int] = []
"""Signals received during this run: a library that calls back into Python (safetensors reading through torch)
may swallow the :class:`Interrupted` raised inside it and fail with an error of its own instead."""


def _raise_interrupted(signum, frame) -> None:
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def _exit_interrupted(signum: int) -> None:
    import signal

    typer.echo("aborted" if signum == signal.SIGINT else "terminated", err=True)
    sys.exit(128 + signum)


def _install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; a signal the caller ignores stays ignored)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, _raise_interrupted)
    return previous


def _click_classes(name: str) -> tuple[type, ...]:
    """``name`` from click and from the copy of click that typer vendors (typer raises the latter)."""
    found = {getattr(click.exceptions, name)}
    try:
        from typer._click import exceptions as vendored  # typer ≥ 0.22 ships its own click
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        found.add(getattr(vendored, name))
    for cls in (typer.Exit, typer.Abort):
        if cls.__name__ == name:
            found.add(cls)
    return tuple(found)


def _one_line(message: str) -> str:
    """``message`` with its line breaks escaped: a path or value holding a newline must not break the one-line error."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _internal_error(e: BaseException) -> None:
    typer.echo(f"internal error: {type(e).__name__}: {_one_line(str(e))} (rerun with SYMMERGE_DEBUG=1 for a traceback)", err=True)
    sys.exit(1)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the CLI with one-line errors instead of tracebacks.

    Exit codes: 0 success, 2 bad input or usage, 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM),
    1 an unexpected failure (a bug).
    """
    import signal

    debug = bool(os.environ.get("SYMMERGE_DEBUG"))
    _RECEIVED.clear()
    previous = _install_signal_handlers()
    try:
        code = app(args=argv, standalone_mode=False)
        # typer turns a KeyboardInterrupt it catches (one not raised by our handler) into the return value 130
        if isinstance(code, int) and code != 0:
            if code == 130:
                typer.echo("aborted", err=True)
            sys.exit(code)
    except SymmergeError as e:
        if _RECEIVED:  # the failure is the interruption, swallowed where it was raised (e.g. a read cut short)
            _exit_interrupted(_RECEIVED[-1])
        if debug:
            raise
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except _click_classes("Exit") as e:
        sys.exit(e.exit_code)
    except _click_classes("ClickException") as e:
        e.show()  # a usage error: the framework's usage line and message
        sys.exit(2 if e.exit_code in (0, 1) else e.exit_code)
    except (Interrupted, KeyboardInterrupt, *_click_classes("Abort")) as e:
        # the framework also turns an EOFError (a file read past its end) into Abort: that is a failure, not Ctrl-C
        cause = e.__cause__ or e.__context__
        if isinstance(e, _click_classes("Abort")) and isinstance(cause, EOFError) and not _RECEIVED:
            if debug:
                raise cause from None
            _internal_error(cause)
        _exit_interrupted(e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    except Exception as e:  # an unexpected failure is a bug: say so briefly
        if _RECEIVED:
            _exit_interrupted(_RECEIVED[-1])
        if debug:
            raise
        _internal_error(e)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


OPENMP_WAIT_POLICY = "PASSIVE"
"""The ``symmerge`` command's default ``OMP_WAIT_POLICY`` (read by torch's OpenMP runtime when torch is imported; the
user's own setting wins): a thread that waits at the end of a parallel region sleeps instead of spinning. With
another process busy on one of the two cores, a spinning thread holds a core the rest of its team needs: a
fine-tune ``align`` of the 4-layer LLaMA-7B-width pair took 46.5 s with the runtime's default against 34.1 s passive
(23.1 s against 24.4 s on the quiet machine, +5 %), and 69.8 s against 31.9 s beside a test run; the independent
pair's ``merge -s all`` (long GEMMs, LAP threads beside them) 199.2 s against 193.7 s, quiet."""


LOG_REDRAW_SECONDS = 30
"""How often a progress bar redraws when stderr is not a terminal (a log file, CI): tqdm redraws with carriage
returns, which a log keeps as one line — 58 KB for the demo's zoo training at tqdm's 0.1 s. The user's own
``TQDM_MININTERVAL`` wins."""


def quiet_bars_in_logs(stream: Any = None) -> None:
    """Progress bars redraw every :data:`LOG_REDRAW_SECONDS` where ``stream`` (stderr) is not a terminal."""
    stream = sys.stderr if stream is None else stream
    if not (hasattr(stream, "isatty") and stream.isatty()):
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_REDRAW_SECONDS))


def run() -> None:
    """The ``symmerge`` console script: :func:`main`, then, after a success, an exit that skips the interpreter's
    teardown. By the time ``main`` returns every output is complete and renamed into place; what a normal exit adds
    is freeing every module's objects (torch's C++ state included), measured at 0.3-0.7 s after a 168M merge that
    takes ~6 s in all, time a command-line user only waits through. Exit handlers (``atexit``: temporary folders,
    Ray) still run, and the streams are flushed. Failures and interruptions exit the ordinary way.

    First, before any command imports torch: freed large buffers are kept for reuse
    (:func:`symmerge.allocator.keep_freed_buffers`), idle OpenMP threads sleep (:data:`OPENMP_WAIT_POLICY`), and
    progress bars written to a log redraw rarely (:func:`quiet_bars_in_logs`)."""
    keep_freed_buffers()
    os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)
    quiet_bars_in_logs()
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run()
