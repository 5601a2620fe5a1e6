"""Property-based fuzzing of what users hand to symmerge: recipes, safetensors files, config.json, shard indexes.

The property everywhere: a one-line ``error:`` (SymmergeError, exit 2) or success — never another exception
(``internal error``, exit 1), never a traceback, never an output (or a temporary folder) left after a failure.
The default suite runs a bounded number of examples per property (deterministic: the "ci" profile in conftest);
``-m slow`` runs each property with many more.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import make_model, save_model, stray_folders
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from symmerge.errors import SymmergeError

FAST = 25  # examples per property in the default suite
LONG = 400  # examples per property with -m slow


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny GPT-2 directories (single file), one sharded copy, and a scratch folder."""
    root = tmp_path_factory.mktemp("fuzz")
    a = save_model(make_model("gpt2", 0)[0], root / "a")
    b = save_model(make_model("gpt2", 1)[0], root / "b")
    sharded = root / "sharded"
    shutil.copytree(b, sharded)
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, sharded / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({k: state[k] for k in keys[half:]}, sharded / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return {"root": root, "a": a, "b": b, "sharded": sharded}


def cli(*args) -> tuple[int, str]:
    """``symmerge ARGS`` in-process: (exit code, stderr)."""
    from symmerge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_clean_outcome(code: int, err: str, out: Path | None = None) -> None:
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert len(err) < 1500, f"message of {len(err)} characters"
        if out is not None:
            assert not out.exists(), "an output was left after a failure"
    if out is not None:
        assert stray_folders(out.parent) == []


def run_commands(model_dir: Path, other: Path, scratch: Path) -> None:
    """inspect, then a merge with alignment (reads every weight, aligns, writes): clean outcomes only."""
    assert_clean_outcome(*cli("inspect", model_dir))
    out = scratch / "out"
    code, err = cli("merge", other, model_dir, "-m", "linear", "-s", "all", "-o", out, "-q", "--shard-size", "20KB")
    assert_clean_outcome(code, err, out)
    shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def scratch_copy(source: Path):
    with tempfile.TemporaryDirectory(dir=source.parent) as d:
        copy = Path(d) / "model"
        shutil.copytree(source, copy)
        yield copy, Path(d)


def one_line_or_success(fn, *args):
    try:
        return fn(*args)
    except SymmergeError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 1500, msg
        return None


# ------------------------------------------------------------------------------------------------- strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
RECIPE_KEYS = ["models", "merge_method", "base_model", "parameters", "alignment", "data", "dtype", "shard_size",
               "allow_unrelated_base", "model", "weight", "density", "lambda", "reference", "symmetries", "path"]
json_like = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(RECIPE_KEYS) | st.text(max_size=6), c, max_size=4),
    max_leaves=16)

YAML_NOISE = list("&*!|>%@{}[]:,-#'\"\n\t ?=~") + ["!!python/object:os.system", "*a", "&a", "<<: *a", "!!binary", "1e400",
                                                   "0x10", ".inf", "~", "\x00", "\ufeff", "9" * 5000]


def valid_recipe(models: dict[str, Path]) -> str:
    return (f"models:\n  - model: {models['a']}\n    parameters: {{weight: 0.6}}\n  - model: {models['b']}\n"
            f"base_model: {models['a']}\nmerge_method: ties\nparameters: {{density: 0.3, lambda: 1.0}}\n"
            f"alignment:\n  reference: {models['a']}\n  symmetries: [ffn, qk, vo]\ndtype: bfloat16\nshard_size: 2GB\n")


@st.composite
def text_mutations(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate-line", "swap-lines"]))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(YAML_NOISE) | st.text(max_size=3)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from(YAML_NOISE)) + text[i + 1:]
        else:
            lines = text.split("\n")
            j, k = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "duplicate-line":
                lines.insert(k, lines[j])
            else:
                lines[j], lines[k] = lines[k], lines[j]
            text = "\n".join(lines)
    return text


def check_recipe_text(models: dict[str, Path], text: str | bytes) -> None:
    from symmerge.merge.planner import plan_merge
    from symmerge.merge.recipe import load_recipe

    with tempfile.TemporaryDirectory(dir=models["root"]) as d:
        path = Path(d) / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        loaded = one_line_or_success(load_recipe, path)
        if loaded is not None:
            one_line_or_success(plan_merge, *loaded)


# ------------------------------------------------------------------------------------------------------ recipes


def _recipe_documents(models, doc):
    check_recipe_text(models, yaml.safe_dump(doc, allow_unicode=True))


recipe_document = st.dictionaries(st.sampled_from(RECIPE_KEYS), json_like, max_size=6) | json_like
model_entries = st.lists(st.fixed_dictionaries({"model": st.sampled_from(["a", "b", "nowhere", ""]),
                                                "parameters": st.dictionaries(st.sampled_from(["weight", "w"]), scalars, max_size=2)}),
                         min_size=0, max_size=3)
plausible_recipe = st.fixed_dictionaries(
    {"models": model_entries, "merge_method": st.sampled_from(["linear", "ties", "slerp", "task_arithmetic", "dare_ties", "nope"])},
    optional={"base_model": st.sampled_from(["a", "b", "nowhere"]),
              "parameters": st.dictionaries(st.sampled_from(["density", "lambda", "t", "normalize", "seed", "trim"]), scalars, max_size=3),
              "alignment": st.sampled_from(["none", "all"])
              | st.fixed_dictionaries({}, optional={"reference": st.sampled_from(["a", "b", "x"]), "symmetries": json_like}),
              "dtype": st.sampled_from(["float32", "bfloat16", "int8"]) | scalars, "shard_size": scalars | st.sampled_from(["1KB", "2 GiB", "-1MB", "0"])})


def _plausible(models, doc):
    for entry in doc["models"]:
        entry["model"] = str(models["root"] / entry["model"]) if entry["model"] in ("a", "b") else entry["model"]
    if doc.get("base_model") in ("a", "b"):
        doc["base_model"] = str(models["root"] / doc["base_model"])
    check_recipe_text(models, yaml.safe_dump(doc))


def _recipe_mutations(models, data):
    check_recipe_text(models, data.draw(text_mutations(valid_recipe(models))))


test_recipe_random_documents = settings(max_examples=FAST * 2)(given(doc=recipe_document)(_recipe_documents))
test_recipe_plausible_documents = settings(max_examples=FAST * 2)(given(doc=plausible_recipe)(_plausible))
test_recipe_text_mutations = settings(max_examples=FAST * 2)(given(data=st.data())(_recipe_mutations))
test_recipe_random_documents_long = pytest.mark.slow(settings(max_examples=LONG * 5)(given(doc=recipe_document)(_recipe_documents)))
test_recipe_plausible_documents_long = pytest.mark.slow(settings(max_examples=LONG * 5)(given(doc=plausible_recipe)(_plausible)))
test_recipe_text_mutations_long = pytest.mark.slow(settings(max_examples=LONG * 5)(given(data=st.data())(_recipe_mutations)))


def test_recipe_valid_baseline(models):
    from symmerge.merge.planner import plan_merge
    from symmerge.merge.recipe import load_recipe

    with tempfile.TemporaryDirectory(dir=models["root"]) as d:
        path = Path(d) / "r.yaml"
        path.write_text(valid_recipe(models))
        plan_merge(*load_recipe(path))  # the seed of the mutations is valid


# ----------------------------------------------------------------------------------------- safetensors files


def _byte_mutations(models, data):
    with scratch_copy(models["a"]) as (model_dir, scratch):
        f = model_dir / "model.safetensors"
        raw = bytearray(f.read_bytes())
        header_len = struct.unpack("<Q", raw[:8])[0]
        for _ in range(data.draw(st.integers(1, 3))):
            op = data.draw(st.sampled_from(["flip", "flip-header", "truncate", "extend", "zero-run"]))
            if op == "truncate" and raw:
                del raw[data.draw(st.integers(0, len(raw) - 1)):]
            elif op == "extend":
                raw += data.draw(st.binary(min_size=1, max_size=64))
            elif len(raw) > 8 or op != "flip-header" and len(raw) > 0:
                hi = min(len(raw), 8 + header_len) if op == "flip-header" else len(raw)
                i = data.draw(st.integers(0, max(hi - 1, 0)))
                if op == "zero-run":
                    raw[i:i + data.draw(st.integers(1, 64))] = b"\x00" * len(raw[i:i + 64])
                else:
                    raw[i] ^= 1 << data.draw(st.integers(0, 7))
        f.write_bytes(bytes(raw))
        run_commands(model_dir, models["b"], scratch)


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX", "", 7, None]


def _header_mutations(models, data):
    with scratch_copy(models["a"]) as (model_dir, scratch):
        f = model_dir / "model.safetensors"
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        names = sorted(k for k in header if k != "__metadata__")
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(names))
            op = data.draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "add", "rename", "metadata", "entry"]))
            if not isinstance(header.get(name), dict) and op not in ("add", "metadata", "entry"):
                continue
            if op == "dtype":
                header[name]["dtype"] = data.draw(st.sampled_from(DTYPES))
            elif op == "shape":
                header[name]["shape"] = data.draw(st.lists(st.integers(-2, 2**40), max_size=4) | json_like)
            elif op == "offsets":
                header[name]["data_offsets"] = data.draw(st.lists(st.integers(-1, len(body) + 10), min_size=0, max_size=3) | json_like)
            elif op == "delete":
                del header[name]
            elif op == "add":
                header[data.draw(st.text(max_size=8))] = data.draw(json_like)
            elif op == "rename":
                header[data.draw(st.sampled_from(names) | st.text(max_size=8))] = header.pop(name)
            elif op == "metadata":
                header["__metadata__"] = data.draw(json_like)
            else:
                header[name] = data.draw(json_like)
        encoded = json.dumps(header).encode()
        length = data.draw(st.sampled_from([len(encoded)] * 4 + [0, len(encoded) + 1, len(encoded) - 1, 2**63]))
        f.write_bytes(struct.pack("<Q", length % 2**64) + encoded + body)
        run_commands(model_dir, models["b"], scratch)


test_safetensors_byte_mutations = settings(max_examples=FAST)(given(data=st.data())(_byte_mutations))
test_safetensors_header_mutations = settings(max_examples=FAST * 2)(given(data=st.data())(_header_mutations))
test_safetensors_byte_mutations_long = pytest.mark.slow(settings(max_examples=LONG)(given(data=st.data())(_byte_mutations)))
test_safetensors_header_mutations_long = pytest.mark.slow(settings(max_examples=LONG)(given(data=st.data())(_header_mutations)))


# ------------------------------------------------------------------------------------- config.json and indexes

CONFIG_KEYS = ["model_type", "n_head", "n_embd", "n_layer", "n_inner", "n_positions", "vocab_size", "num_attention_heads",
               "hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "head_dim",
               "tie_word_embeddings", "torch_dtype", "dtype", "layer_norm_epsilon", "activation_function", "architectures"]


def _config_mutations(models, data):
    with scratch_copy(models["a"]) as (model_dir, scratch):
        config = json.loads((model_dir / "config.json").read_text())
        mode = data.draw(st.sampled_from(["edit", "replace", "text"]))
        if mode == "text":
            (model_dir / "config.json").write_text(data.draw(text_mutations(json.dumps(config, indent=1))))
        else:
            if mode == "replace":
                config = data.draw(json_like)
            else:
                for _ in range(data.draw(st.integers(1, 3))):
                    key = data.draw(st.sampled_from(CONFIG_KEYS))
                    if data.draw(st.booleans()):
                        config.pop(key, None)
                    else:
                        config[key] = data.draw(st.integers(-3, 100) | st.sampled_from(["gpt2", "llama", "bert", "t5", ""]) | json_like)
            (model_dir / "config.json").write_text(json.dumps(config))
        run_commands(model_dir, models["b"], scratch)


def _index_mutations(models, data):
    with scratch_copy(models["sharded"]) as (model_dir, scratch):
        path = model_dir / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        keys = sorted(index["weight_map"])
        shards = sorted(set(index["weight_map"].values()))
        for _ in range(data.draw(st.integers(1, 3))):
            op = data.draw(st.sampled_from(["move", "delete", "add", "value", "weight_map", "top", "delete-shard", "text"]))
            wm_ok = isinstance(index, dict) and isinstance(index.get("weight_map"), dict)
            if op == "move" and wm_ok:
                bad = ["missing.safetensors", "../a/model.safetensors", "", ".", "config.json"]
                index["weight_map"][data.draw(st.sampled_from(keys))] = data.draw(st.sampled_from(shards + bad))
            elif op == "delete" and wm_ok:
                index["weight_map"].pop(data.draw(st.sampled_from(keys)), None)
            elif op == "add" and wm_ok:
                index["weight_map"][data.draw(st.text(max_size=8))] = data.draw(st.sampled_from(shards) | json_like)
            elif op == "value" and wm_ok:
                index["weight_map"][data.draw(st.sampled_from(keys))] = data.draw(json_like)
            elif op == "weight_map":
                index = {"weight_map": data.draw(json_like)}
            elif op == "top":
                index = data.draw(json_like)
            elif op == "delete-shard":
                (model_dir / data.draw(st.sampled_from(shards))).unlink(missing_ok=True)
        if data.draw(st.booleans()):
            path.write_text(json.dumps(index))
        else:
            path.write_text(data.draw(text_mutations(json.dumps(index))))
        run_commands(model_dir, models["a"], scratch)


test_config_mutations = settings(max_examples=FAST * 2)(given(data=st.data())(_config_mutations))
test_index_mutations = settings(max_examples=FAST * 2)(given(data=st.data())(_index_mutations))
test_config_mutations_long = pytest.mark.slow(settings(max_examples=LONG)(given(data=st.data())(_config_mutations)))
test_index_mutations_long = pytest.mark.slow(settings(max_examples=LONG)(given(data=st.data())(_index_mutations)))


def test_unmutated_inputs_succeed(models):
    """The seeds of every mutation are valid: both commands succeed on them."""
    for name in ("a", "sharded"):
        with scratch_copy(models[name]) as (model_dir, scratch):
            assert cli("inspect", model_dir)[0] == 0
            out = scratch / "out"
            code, err = cli("merge", models["b"], model_dir, "-m", "linear", "-s", "all", "-o", out, "-q", "--shard-size", "20KB")
            assert code == 0, err
            assert (out / "model.safetensors.index.json").is_file()
