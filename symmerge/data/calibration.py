"""Calibration sets, for Fisher merging, RegMean, activation and learned matching: one loader for every source.

Three sources:

- ``zoo``: the *training* split of the task a zoo model was trained for (read from its zoo.json; never the
  held-out data its scores come from): images → ``pixel_values``, text → windows of the recipe's context;

- a text file (any suffix but ``.npz``): one example per non-empty line, the first ``num_examples`` lines in file
  order, tokenised with the model's own tokenizer (``model_dir``), truncated to ``max_length`` tokens and padded
  (on the right) to the longest line of each batch → ``input_ids``, ``attention_mask`` (batch, tokens), int64;
- an ``.npz``: an array ``inputs`` (or the file's only array) of N examples, optionally ``labels`` (N, ...) and,
  for padded token ids, ``attention_mask`` (same shape as ``inputs``). Integer inputs are token ids (N, tokens) →
  ``input_ids`` (+ ``attention_mask``, all ones unless given); floating inputs go to the model's
  ``main_input_name`` (e.g. ``pixel_values`` (N, channels, height, width) for a ViT, already normalised as the
  model expects); labels → ``labels`` (int64, or float32 for float labels).

Every batch is a ``dict[str, torch.Tensor]`` that can be passed as ``model(**batch)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.lazy import lazy_module
from symmerge.zoo.data import load_digits, load_fashion_mnist, load_shakespeare
from symmerge.zoo.evaluate import lm_windows
from symmerge.zoo.registry import read_record

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py

# files from which a Hugging Face tokenizer can be built (without one, transformers 5 silently builds an empty one)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.tiktoken")
_PROGRESS_MIN_LINES = 5000  # tokenising fewer lines takes well under a second: no progress bar
BATCH_SIZE = 32  # examples per forward pass: statistics are sums over examples, so this only bounds memory


def load_calibration(
    path: str | Path,
    *,
    model_dir: str | Path | None = None,
    main_input_name: str = "input_ids",
    max_length: int = 128,
    num_examples: int = 256,
    batch_size: int = BATCH_SIZE,
    labels: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The first ``num_examples`` examples of ``path`` as model-input batches of at most ``batch_size`` examples.

    ``model_dir``: the checkpoint whose tokenizer tokenises a text file (unused for ``.npz``).
    ``main_input_name``: the model's ``main_input_name`` (``input_ids`` for text models, ``pixel_values`` for a
    ViT): where floating ``.npz`` inputs go. ``max_length``: truncation of text lines, in tokens.
    ``labels``: also return ``labels`` for a loss (learned matching): the classes of a zoo classifier, or the
    token ids themselves for a text model (pad positions −100; the model shifts them). The selection is
    deterministic: the first ``num_examples`` examples in file order.

    Returns a list of batches: text → ``{"input_ids", "attention_mask"}`` (b, t) int64 with t ≤ ``max_length``,
    padded on the right per batch; ``.npz`` → ``{"input_ids", "attention_mask"}`` (b, t) or
    ``{main_input_name: (b, ...) float32}``, plus ``labels`` (b, ...) when the file has them.
    Raises :class:`SymmergeError` naming the file and the problem.
    """
    if str(path) == "zoo":
        return _zoo_batches(model_dir, num_examples, batch_size, labels)
    path = Path(path)
    for name, value in (("max_length", max_length), ("num_examples", num_examples), ("batch_size", batch_size)):
        if int(value) <= 0:
            raise SymmergeError(f"calibration {name} must be a positive integer, got {value}")
    if not path.exists():
        raise SymmergeError(f"calibration data {path} does not exist: give a text file (one example per line) or an .npz")
    if not path.is_file():
        raise SymmergeError(f"calibration data {path} is not a file: give a text file (one example per line) or an .npz")
    if path.suffix.lower() == ".npz":
        batches = _npz_batches(path, main_input_name, num_examples, batch_size)
        config = model_config(model_dir)
        if "input_ids" in batches[0]:
            _check_token_ids(path, batches, config)
        return _npz_labels(path, batches, config) if labels else batches  # the file's labels, if any, always come along
    if main_input_name != "input_ids":
        raise SymmergeError(f"{path}: text calibration data is tokenised, but this model takes {main_input_name!r}: "
                            f"give an .npz whose 'inputs' array holds float {main_input_name}")
    return _text_batches(path, model_dir, max_length, num_examples, batch_size, labels)


def model_config(model_dir: str | Path | None) -> dict:
    """The model's config.json as a dict ({} when there is none to read)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text()) if model_dir is not None else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _check_token_ids(path: Path, batches: list[dict[str, torch.Tensor]], config: dict) -> None:
    """Token ids inside the model's vocabulary and examples no longer than its positions (else an index error deep
    inside the model)."""
    vocab = config.get("vocab_size")
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    top = max(int(b["input_ids"].max()) for b in batches)
    if isinstance(vocab, int) and top >= vocab:
        raise SymmergeError(f"{path}: 'inputs' holds token id {top}, but the model's vocabulary has {vocab} tokens "
                            f"(ids 0..{vocab - 1}): tokenise with the model's own tokenizer")
    length = batches[0]["input_ids"].shape[1]
    if isinstance(positions, int) and length > positions:
        raise SymmergeError(f"{path}: 'inputs' has {length} tokens per example, but the model takes at most "
                            f"{positions}: cut the examples to {positions} tokens")


def _npz_labels(path: Path, batches: list[dict[str, torch.Tensor]], config: dict) -> list[dict[str, torch.Tensor]]:
    """Batches with labels for a loss: a language model's own tokens (pads −100; it shifts them), or for a
    classifier the file's labels (one class per example)."""
    classifier = any(str(a).endswith(("ForSequenceClassification", "ForImageClassification")) for a in config.get("architectures") or [])
    if "input_ids" in batches[0] and not classifier:
        return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]
    if "labels" not in batches[0]:
        raise SymmergeError(f"{path}: a loss on a classifier needs 'labels' (one class per example) in the .npz")
    return batches


def _zoo_batches(model_dir: str | Path | None, num_examples: int, batch_size: int, labels: bool) -> list[dict[str, torch.Tensor]]:
    """The training split of a zoo model's task: image batches, or LM windows of the recipe's context."""
    if model_dir is None or not (Path(model_dir) / "zoo.json").is_file():
        raise SymmergeError(f"--data zoo needs a zoo model (with zoo.json); {model_dir} is not one: give a .txt or .npz")
    record = read_record(Path(model_dir))
    if record["task"] == "image-classification":
        split = load_digits() if record["dataset"] == "digits" else load_fashion_mnist()
        columns = {"pixel_values": split.train_images[:num_examples]}
        if labels:
            columns["labels"] = split.train_labels[:num_examples]
    else:
        windows = lm_windows(load_shakespeare().train, record["recipe"]["context"], num_examples)[:, :-1]
        columns = {"input_ids": windows}
        if labels:  # causal LM: the model shifts the labels itself
            columns["labels"] = windows
    n = len(next(iter(columns.values())))
    return [{k: v[s:s + batch_size] for k, v in columns.items()} for s in range(0, n, batch_size)]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (no pickles), or a one-line error saying how to save one."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise SymmergeError(f"{path} holds a single .npy array, not an .npz archive: save it with "
                                f"numpy.savez(path, inputs=..., labels=...)")
        with data:
            return {name: data[name] for name in data.files}
    except SymmergeError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises OSError, ValueError, BadZipFile, EOFError... for bad files
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise SymmergeError(f"{path} is not a readable .npz ({reason}); save one with "
                            f"numpy.savez(path, inputs=..., labels=...)") from None


def _npz_batches(path: Path, main_input_name: str, num_examples: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    arrays = read_npz(path)
    if "inputs" in arrays:
        inputs = arrays["inputs"]
    elif len(arrays) == 1 and next(iter(arrays)) not in ("labels", "attention_mask"):
        inputs = next(iter(arrays.values()))
    else:
        have = ", ".join(repr(k) for k in arrays) or "no arrays"
        raise SymmergeError(f"{path} has no array named 'inputs' (it has {have}): save the model inputs as 'inputs'")
    labels = arrays.get("labels")
    mask = arrays.get("attention_mask")

    if inputs.ndim == 0 or len(inputs) == 0:
        raise SymmergeError(f"{path}: 'inputs' is empty (shape {inputs.shape}): it needs at least one example")
    if labels is not None and (labels.ndim == 0 or len(labels) != len(inputs)):
        raise SymmergeError(f"{path}: 'labels' has shape {labels.shape} but 'inputs' holds {len(inputs)} examples: "
                            f"the first dimensions must agree")
    if labels is not None and not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise SymmergeError(f"{path}: 'labels' has dtype {labels.dtype}: labels must be integers (classes) or floats")

    inputs, labels = inputs[:num_examples], None if labels is None else labels[:num_examples]
    if np.issubdtype(inputs.dtype, np.integer):
        if main_input_name != "input_ids":
            raise SymmergeError(f"{path}: 'inputs' holds integers ({inputs.dtype}) but this model takes float "
                                f"{main_input_name!r}: save them as float32, preprocessed as the model expects")
        if inputs.ndim != 2:
            raise SymmergeError(f"{path}: integer 'inputs' are token ids and must be 2-D (examples, tokens), "
                                f"got shape {inputs.shape}")
        if inputs.min() < 0:
            raise SymmergeError(f"{path}: 'inputs' holds negative token ids (min {inputs.min()})")
        x = torch.from_numpy(np.ascontiguousarray(inputs)).long()
        if mask is None:
            m = torch.ones_like(x)
        else:
            if mask.shape != arrays["inputs"].shape:
                raise SymmergeError(f"{path}: 'attention_mask' has shape {mask.shape}, 'inputs' "
                                    f"{arrays['inputs'].shape}: they must be equal")
            m = torch.from_numpy(np.ascontiguousarray(mask[:num_examples])).long()
        columns = {"input_ids": x, "attention_mask": m}
    elif np.issubdtype(inputs.dtype, np.floating):
        if main_input_name == "input_ids":
            raise SymmergeError(f"{path}: 'inputs' holds floats ({inputs.dtype}) but this model takes token ids: "
                                f"save integer token ids (or a text file)")
        if not np.isfinite(inputs).all():
            raise SymmergeError(f"{path}: 'inputs' holds NaN or infinite values")
        columns = {main_input_name: torch.from_numpy(np.ascontiguousarray(inputs)).float()}
    else:
        raise SymmergeError(f"{path}: 'inputs' has dtype {inputs.dtype}: save integer token ids or float inputs")
    if labels is not None:
        t = torch.from_numpy(np.ascontiguousarray(labels))
        columns["labels"] = t.float() if t.dtype.is_floating_point else t.long()

    n = len(next(iter(columns.values())))
    return [{k: v[s:s + batch_size] for k, v in columns.items()} for s in range(0, n, batch_size)]


def _load_tokenizer(path: Path, model_dir: str | Path | None):
    if model_dir is None:
        raise SymmergeError(f"{path} is a text file, which is tokenised with the model's tokenizer, but no model "
                            f"directory was given: pass model_dir, or give an .npz of token ids")
    model_dir = Path(model_dir)
    has_files = model_dir.is_dir() and any((model_dir / f).is_file() for f in _TOKENIZER_FILES)
    tokenizer = None
    if has_files:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - transformers raises many types here
            tokenizer = None
    # transformers 5 builds an empty tokenizer from a bare config: a vocabulary of special tokens only is no tokenizer
    if tokenizer is None or len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise SymmergeError(f"text calibration data ({path.name}) is tokenised with the model's tokenizer, and "
                            f"{model_dir} has none: add the tokenizer files there, or give an .npz of token ids")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SymmergeError(f"the tokenizer in {model_dir} has neither a pad nor an eos token to pad batches "
                                f"with: use batch_size 1, or give an .npz of token ids")
        tokenizer.pad_token = tokenizer.eos_token
    # right padding: padded positions then follow every real token (causal models see no difference, and
    # statistics.fisher_diagonal can strip them)
    tokenizer.padding_side = "right"
    return tokenizer


def _text_batches(path: Path, model_dir, max_length: int, num_examples: int, batch_size: int,
                  labels: bool = False) -> list[dict[str, torch.Tensor]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SymmergeError(f"cannot read calibration data {path} ({e})") from None
    lines = []
    for line in text.splitlines():
        if line.strip():
            lines.append(line.strip())
            if len(lines) == num_examples:
                break
    if not lines:
        raise SymmergeError(f"{path} holds no non-empty line: write one calibration example per line")
    tokenizer = _load_tokenizer(path, model_dir)
    starts = range(0, len(lines), batch_size)
    batches = []
    for s in tqdm(starts, desc="Tokenising", unit="batch", leave=False, disable=len(lines) < _PROGRESS_MIN_LINES):
        enc = tokenizer(lines[s:s + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
        if labels:  # a causal LM's own tokens, pads ignored by the loss
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches

