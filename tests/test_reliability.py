"""Reliability: outputs never destroy inputs, interrupts clean up, races are refused, and every bad input a user
can give is a one-line ``error:`` (exit 2), never an ``internal error`` (exit 1, reserved for bugs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import cli_env, expect_cli_error, make_model, run_cli, save_model, stray_folders
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import symmerge
from symmerge.errors import SymmergeError
from symmerge.io import output as output_mod
from symmerge.io.output import MARKER, atomic_output_dir


@pytest.fixture
def pair(tmp_path):
    """A reference GPT-2 directory and a scrambled copy of it."""
    model, _ = make_model("gpt2")
    ref = save_model(model, tmp_path / "ref")
    scrambled = symmerge.apply_random_symmetry(load_file(ref / "model.safetensors"), config=model.config, seed=5)
    return ref, save_model(model, tmp_path / "scrambled", scrambled)


def intact(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- 1. --force data loss


def test_out_equal_to_an_input_is_refused_even_with_force(pair, tmp_path, capsys):
    ref, other = pair
    for out in (ref, other):
        expect_cli_error(capsys, "is the input", "align", ref, other, "-o", out, "--force", "-q")
        expect_cli_error(capsys, "is the input", "merge", ref, other, "-m", "linear", "-o", out, "--force", "-q")
    assert intact(ref) and intact(other)


def test_out_equal_to_base_or_reference_is_refused(pair, tmp_path, capsys):
    ref, other = pair
    base = save_model(make_model("gpt2")[0], tmp_path / "base")
    expect_cli_error(capsys, "is the input", "merge", ref, other, "-m", "task_arithmetic", "--base", base, "-o", base, "--force")
    expect_cli_error(capsys, "is the input", "merge", ref, other, "-m", "linear", "--reference", ref, "-o", ref, "--force")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: ties\nbase_model: {base}\n")
    expect_cli_error(capsys, "is the input", "merge", recipe, "-o", base, "--force")
    assert intact(base) and intact(ref)


def test_out_equal_to_calibration_data_is_refused(pair, tmp_path, capsys):
    ref, other = pair
    data = tmp_path / "calib.npz"
    np.savez(data, inputs=np.random.default_rng(0).integers(0, 64, (8, 12)))
    expect_cli_error(capsys, "is the input", "merge", ref, other, "-m", "fisher", "--data", data, "-o", data, "--force")
    expect_cli_error(capsys, "is the input", "align", ref, other, "--match", "activations", "--data", data, "-o", data, "--force")
    assert data.is_file() and np.load(data)["inputs"].shape == (8, 12)


def test_out_containing_or_inside_an_input_is_refused(pair, tmp_path, capsys):
    ref, other = pair
    expect_cli_error(capsys, "contains the input", "align", ref, other, "-o", tmp_path, "--force")
    expect_cli_error(capsys, "contains the input", "merge", ref, other, "-m", "linear", "-o", tmp_path, "--force")
    expect_cli_error(capsys, "lies inside the input", "align", ref, other, "-o", ref / "aligned")
    expect_cli_error(capsys, "lies inside the input", "merge", ref, other, "-m", "linear", "-o", other / "sub" / "deeper", "--force")
    expect_cli_error(capsys, "is the input", "merge", ref, other, "-m", "linear", "-o", other / "sub" / "..", "--force")
    assert intact(ref) and intact(other) and not (ref / "aligned").exists()


def test_out_through_a_symlink_to_an_input_is_refused(pair, tmp_path, capsys):
    ref, other = pair
    (tmp_path / "link").symlink_to(ref)
    expect_cli_error(capsys, "is the input", "align", ref, other, "-o", tmp_path / "link", "--force")
    assert intact(ref)


def test_force_replaces_only_symmerge_outputs_or_empty_folders(pair, tmp_path, capsys):
    ref, other = pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    err = expect_cli_error(capsys, "not a symmerge output", "merge", ref, other, "-m", "linear", "-o", mine, "--force")
    assert "remove it yourself" in err and (mine / "notes.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    expect_cli_error(capsys, "is a file", "merge", ref, other, "-m", "linear", "-o", tmp_path / "afile", "--force")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", empty, "--force", "-q")[0] == 0
    assert (empty / MARKER).is_file() and (empty / "merge.yaml").is_file()
    # an earlier symmerge output (new marker, or only the markers older versions wrote) may be replaced
    assert run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", empty, "--force", "-q")[0] == 0
    (empty / MARKER).unlink()
    assert run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", empty, "--force", "-q")[0] == 0
    aligned = tmp_path / "aligned"
    assert run_cli(capsys, "align", ref, other, "-o", aligned, "-q")[0] == 0
    (aligned / MARKER).unlink()  # as written before the marker: alignment.json identifies it
    assert run_cli(capsys, "align", ref, other, "-o", aligned, "--force", "-q")[0] == 0
    assert stray_folders(tmp_path) == []


def test_out_dot_force(pair, tmp_path, capsys, monkeypatch):
    ref, other = pair
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", ".", "--force", "-q")
    assert code == 0, err
    assert (work / "model.safetensors").is_file() and (work / MARKER).is_file()
    assert stray_folders(tmp_path) == [] and stray_folders(work) == []
    # the current folder holding the inputs: refused, nothing touched
    monkeypatch.chdir(tmp_path)
    expect_cli_error(capsys, "contains the input", "merge", "ref", "scrambled", "-m", "linear", "-o", ".", "--force")
    assert intact(ref) and stray_folders(tmp_path) == []


def test_outputs_are_created_with_the_umask_permissions(pair, tmp_path, capsys):
    ref, other = pair
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", tmp_path / "m", "-q")[0] == 0
        assert run_cli(capsys, "align", ref, other, "-o", tmp_path / "a", "-q")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------- 2 + 4. SIGINT and SIGTERM


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory):
    """Three GPT-2 models large enough that aligning them takes several seconds."""
    d = tmp_path_factory.mktemp("slow")
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=64, n_positions=32)
    for i in range(3):
        torch.manual_seed(i)
        save_model(transformers.GPT2LMHeadModel(cfg), d / f"m{i}")
    return d


def _restore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have ignored it for us


@pytest.mark.parametrize("sig, code, message", [(signal.SIGINT, 130, "aborted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_run_exits_with_its_code_and_leaves_nothing(slow_job, tmp_path, sig, code, message):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "symmerge.cli", "align", *(slow_job / f"m{i}" for i in range(3)), "-o", out, "-q"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_restore_sigint)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before the signal could be sent: make slow_job larger"
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip() == message and "Traceback" not in err
    assert not out.exists() and stray_folders(tmp_path) == []


def test_signal_during_startup_exits_with_its_code(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time, symmerge.cli as c; time.sleep(0.5); c.main(['methods'])"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_restore_sigint)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGTERM, 143)  # before main() the default action: killed by SIGTERM


def test_a_signal_swallowed_inside_a_read_still_ends_the_run_with_its_code(pair, tmp_path, capsys, monkeypatch):
    """safetensors reads through torch, which can swallow the exception a signal handler raises and fail with an
    error of its own (then reported as a corrupt file): the run must still end as the signal says, 143."""
    ref, other = pair
    import symmerge.io.stream as stream

    real = stream.LazyState.__getitem__
    calls = []

    def read_cut_short(self, key):
        calls.append(key)
        if len(calls) == 5:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here and raises; the "library" swallows it
            except BaseException:
                pass
            raise SymmergeError("cannot read model.safetensors: could not determine the shape (the file is corrupt or truncated)")
        return real(self, key)

    monkeypatch.setattr(stream.LazyState, "__getitem__", read_cut_short)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-q")
    assert len(calls) >= 5 and code == 143 and err.strip() == "terminated"
    assert not (tmp_path / "out").exists() and stray_folders(tmp_path) == []
    calls.clear()
    monkeypatch.setattr(stream.LazyState, "__getitem__", lambda self, key: (_ for _ in ()).throw(SymmergeError("cannot read x")))
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-q")
    assert code == 2 and err.strip() == "error: cannot read x"  # without a signal, the error is the error


def test_keyboard_interrupt_inside_the_framework_is_not_success(pair, tmp_path, capsys, monkeypatch):
    """typer turns a KeyboardInterrupt into a return value of 130 in non-standalone mode: main() must honour it."""
    ref, other = pair
    import symmerge.io.stream as stream

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "LazyState", interrupted)  # align reads the weights through mmap
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-q")
    assert code == 130 and err.strip() == "aborted"
    assert not (tmp_path / "out").exists() and stray_folders(tmp_path) == []


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "mkdir-fallback"])
def test_interrupt_during_the_final_swap_leaves_one_complete_output(tmp_path, monkeypatch, native):
    """A SIGTERM arriving in the middle of replacing a forced output: afterwards the output is complete (old or
    new, here new: the signal is held until the swap is done) and nothing else is left."""
    from symmerge.cli import Interrupted, _raise_interrupted

    if not native:
        monkeypatch.setattr(output_mod, "_renameat2", lambda src, dst, flags: False)
    real = output_mod.rename_noreplace if not native else output_mod._renameat2

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # after the old output was moved aside (fallback) / before the swap
        return real(*a, **k)

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("old")
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        monkeypatch.setattr(output_mod, "rename_noreplace" if not native else "_renameat2", signalled)
        with pytest.raises(Interrupted):
            with atomic_output_dir(out, force=True) as tmp:
                (tmp / "v").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert (out / "v").read_text() == "new" and (out / MARKER).is_file()
    assert stray_folders(tmp_path) == []


# -------------------------------------------------------------------------------------------- 3. concurrent runs


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "mkdir-fallback"])
def test_final_rename_never_replaces_an_output_that_appeared(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(output_mod, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    for appeared in ("non-empty", "empty"):
        with pytest.raises(SymmergeError, match="appeared while this run was working") as e:
            with atomic_output_dir(out) as tmp:
                (tmp / "mine").write_text("new")
                out.mkdir()  # another run (or the user) got there first
                if appeared == "non-empty":
                    (out / "theirs").write_text("old")
        assert "\n" not in str(e.value)
        assert not (out / "mine").exists() and stray_folders(tmp_path) == []
        assert (out / "theirs").exists() == (appeared == "non-empty")
        for p in sorted(out.iterdir()):
            p.unlink()
        out.rmdir()
    # with --force the newcomer is replaced when it is a symmerge output (or empty)
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "mine").write_text("new")
        out.mkdir()
        (out / MARKER).write_text("")
    assert (out / "mine").read_text() == "new" and stray_folders(tmp_path) == []
    # ... but never a folder of the user's
    with pytest.raises(SymmergeError, match="not a symmerge output"):
        with atomic_output_dir(tmp_path / "o2", force=True) as tmp:
            (tmp_path / "o2").mkdir()
            (tmp_path / "o2" / "precious").write_text("x")
    assert (tmp_path / "o2" / "precious").exists() and stray_folders(tmp_path) == []


def test_two_racing_runs_one_wins_one_fails_in_one_line(pair, tmp_path):
    ref, other = pair
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "symmerge.cli", "merge", ref, other, "-m", "linear", "-o", out, "-q"]
    procs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert err.startswith("error: ") and err.count("\n") == 1 and ("appeared while" in err or "already exists" in err)
    assert (out / "model.safetensors").is_file() and stray_folders(tmp_path) == []


# ------------------------------------------------------------------------------------- 5. hostile recipe values


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["weight", "method parameter", "top level"])
def test_yaml_alias_bomb_is_refused_quickly(pair, tmp_path, capsys, where):
    ref, other = pair
    value = "*l8"
    body = {
        "weight": f"models:\n  - model: {ref}\n    parameters: {{weight: {value}}}\n  - model: {other}\nmerge_method: linear\n",
        "method parameter": f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: ties\nbase_model: {ref}\nparameters: {{density: {value}}}\n",
        "top level": f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: linear\nextra: {value}\n",
    }[where]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb() + body)
    start = time.perf_counter()
    err = expect_cli_error(capsys, "expands to more than", "merge", recipe, "-o", tmp_path / "o")
    assert time.perf_counter() - start < 5 and len(err) < 400


def test_long_values_are_cut_in_messages(pair, tmp_path, capsys):
    ref, other = pair
    huge = "x" * 500_000
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"models:\n  - model: {ref}\n    parameters: {{weight: '{huge}'}}\n  - model: {other}\nmerge_method: linear\n")
    err = expect_cli_error(capsys, "weight must be a number", "merge", recipe, "-o", tmp_path / "o")
    assert len(err) < 400 and "…" in err
    recipe.write_text(f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: ties\nbase_model: {ref}\nparameters: {{density: '{huge}'}}\n")
    err = expect_cli_error(capsys, "density", "merge", recipe, "-o", tmp_path / "o")
    assert len(err) < 400
    recipe.write_text(f"models: [{{model: '{huge}'}}]\nmerge_method: linear\n")
    assert len(expect_cli_error(capsys, "models.0.model", "merge", recipe, "-o", tmp_path / "o")) < 400
    err = expect_cli_error(capsys, "--weights", "merge", ref, other, "-m", "linear", "--weights", huge, "-o", tmp_path / "o")
    assert len(err) < 400
    err = expect_cli_error(capsys, "density", "merge", ref, other, "-m", "ties", "--base", ref, "-p", f"density={huge}", "-o", tmp_path / "o")
    assert len(err) < 400
    big = tmp_path / "big.yaml"
    big.write_text("models: []\n# " + "x" * (11 << 20) + "\n")
    err = expect_cli_error(capsys, "a recipe is at most", "merge", big, "-o", tmp_path / "o")
    assert len(err) < 400


def test_param_option_with_broken_yaml_or_bomb(pair, tmp_path, capsys):
    ref, other = pair
    expect_cli_error(capsys, "is not a value", "merge", ref, other, "-m", "ties", "--base", ref, "-p", "density=[1,", "-o", tmp_path / "o")
    bomb = "&a [" + ",".join(["x"] * 9) + "]"
    expect_cli_error(capsys, "density", "merge", ref, other, "-m", "ties", "--base", ref, "-p", f"density={bomb}", "-o", tmp_path / "o")


# ------------------------------------------------------------------------------- 6. errors, never internal ones


def _set_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (model_dir / "config.json").write_text(json.dumps(config))


def test_zero_attention_heads_is_an_error_naming_the_model(pair, capsys):
    ref, other = pair
    _set_config(other, n_head=0)
    err = expect_cli_error(capsys, "n_head must be a positive integer, got 0", "inspect", other)
    assert str(other) in err


def test_weight_map_that_is_not_a_mapping(pair, tmp_path, capsys):
    ref, _ = pair
    (ref / "model.safetensors").rename(ref / "shard.safetensors")  # an index beside model.safetensors is not read
    (ref / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["shard.safetensors"]}))
    expect_cli_error(capsys, "is not a valid safetensors index", "inspect", ref)
    (ref / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    expect_cli_error(capsys, "must name a shard file", "inspect", ref)
    (ref / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    expect_cli_error(capsys, "must name a shard file", "inspect", ref)


def test_unwritable_output_location_is_refused_before_any_work(pair, tmp_path, capsys, monkeypatch):
    ref, other = pair
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdtemp = output_mod.tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*a, dir=dir, **k)

    monkeypatch.setattr(output_mod.tempfile, "mkdtemp", mkdtemp)
    import symmerge.io as io
    import symmerge.merge.engine as engine

    def no_work(*a, **k):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(engine, "run_merge", no_work)
    monkeypatch.setattr(io, "load_state_dict", no_work)
    expect_cli_error(capsys, "cannot write --out", "merge", ref, other, "-m", "linear", "-o", locked / "out")
    expect_cli_error(capsys, "cannot write --out", "align", ref, other, "-o", locked / "out")
    expect_cli_error(capsys, "parent directory", "align", ref, other, "-o", tmp_path / "no" / "such" / "out")


def test_malicious_pickle_is_one_line(pair, tmp_path, capsys):
    ref, other = pair
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((ref / "config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, evil / "pytorch_model.bin")
    err = expect_cli_error(capsys, "holds objects other than tensors", "align", ref, evil, "-o", tmp_path / "o", "--allow-pickle")
    assert "GLOBAL" in err and len(err) < 400
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["merge", "a", "b", "--foo"], "No such option: --foo"),
    (["merge"], "Missing argument"),
    (["inspect"], "Missing argument"),
    (["align", "a", "b"], "Missing option '--out'"),
    (["frobnicate"], "No such command"),
    (["merge", "a", "-o", "x", "--shard-size"], "requires an argument"),
])
def test_usage_errors_are_usage_messages_with_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err
    assert message in err and "Error:" in err and "internal error" not in err and "Traceback" not in err


def test_npz_token_ids_for_activation_matching_on_gpt2(pair, tmp_path, capsys):
    ref, other = pair
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, inputs=rng.integers(0, 64, (8, 12)), labels=rng.integers(0, 3, 8))  # the documented format
    for match in ("activations", "learned"):
        code, _, err = run_cli(capsys, "align", ref, other, "--match", match, "--learn-steps", 2, "--data", data, "-o", tmp_path / match, "-q")
        assert code == 0, err
    np.savez(data, inputs=rng.integers(0, 64, (8, 100)))
    expect_cli_error(capsys, "takes at most 32", "align", ref, other, "--match", "activations", "--data", data, "-o", tmp_path / "x")
    np.savez(data, inputs=rng.integers(0, 1000, (8, 12)))
    expect_cli_error(capsys, "vocabulary has 64 tokens", "align", ref, other, "--match", "activations", "--data", data, "-o", tmp_path / "x")


# ----------------------------------------------------------------------------------- 7. messages with context


def test_legacy_pickle_is_read_or_named_as_legacy(pair, tmp_path, capsys):
    ref, other = pair
    state = load_file(other / "model.safetensors")
    (other / "model.safetensors").unlink()
    torch.save(state, other / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "o", "--allow-pickle", "-q")
    assert code == 0, err  # weights-only loading handles the legacy format, just without mmap
    data = (other / "pytorch_model.bin").read_bytes()
    (other / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    err = expect_cli_error(capsys, "legacy (pre-1.6, non-zip) torch pickle format", "inspect", other, "--allow-pickle")
    assert "convert it" in err


def test_config_without_model_type_or_heads_names_the_model(pair, capsys):
    ref, other = pair
    _set_config(other, model_type=None)
    err = expect_cli_error(capsys, "has no model_type", "align", ref, other, "-o", other.parent / "o")
    assert f"model {other}" in err
    _set_config(other, model_type="gpt2", n_head=None)
    err = expect_cli_error(capsys, "has none of n_head, num_attention_heads", "inspect", other)
    assert f"model {other}" in err


def test_yaml_syntax_error_gives_line_and_column(pair, tmp_path, capsys):
    ref, other = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - model: {ref}\n  - model: [{other}\nmerge_method: linear\n")
    expect_cli_error(capsys, "is not valid YAML at line 4, column", "merge", recipe, "-o", tmp_path / "o")
    recipe.write_text("models:\n\t- a\n")
    expect_cli_error(capsys, "at line 2, column 1", "merge", recipe, "-o", tmp_path / "o")


# ---------------------------------------------------------------------------- 8. inconsistent input refused


def _shard(model_dir: Path, ghost: bool = False) -> None:
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, model_dir / "a.safetensors", metadata={"format": "pt"})
    save_file({k: state[k] for k in keys[5:]}, model_dir / "b.safetensors", metadata={"format": "pt"})
    weight_map = {k: "a.safetensors" for k in keys[:5]} | {k: "b.safetensors" for k in keys[5:]}
    if ghost:
        weight_map["transformer.ghost.weight"] = "a.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_naming_a_tensor_no_shard_holds(pair, tmp_path, capsys):
    ref, other = pair
    _shard(other)
    assert run_cli(capsys, "inspect", other)[0] == 0
    _shard(ref, ghost=True)
    expect_cli_error(capsys, "'transformer.ghost.weight' is in a.safetensors, but that shard does not hold it", "inspect", ref)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    moved = sorted(index["weight_map"])[0]
    del index["weight_map"][moved]
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_cli_error(capsys, "does not list tensor", "inspect", other)


def test_boolean_shard_size_is_not_a_size(pair, tmp_path, capsys):
    ref, other = pair
    recipe = tmp_path / "r.yaml"
    for bad in ("true", "false", "[1]", "-5", "-1"):  # 0 is mergekit's "no limit" (test_recipes: one shard)
        recipe.write_text(f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: linear\nshard_size: {bad}\n")
        expect_cli_error(capsys, "shard_size", "merge", recipe, "-o", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ 9. output as it should be


def test_config_dtype_matches_the_weights_written(tmp_path, capsys):
    base_model, _ = make_model("gpt2")
    base = save_model(base_model, tmp_path / "base")  # float32
    fine = []
    for i in range(2):
        m, _ = make_model("gpt2")
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        fine.append(save_model(m.to(torch.bfloat16), tmp_path / f"ft{i}"))
    for align in ("all", "none"):
        out = tmp_path / f"out-{align}"
        code, _, err = run_cli(capsys, "merge", *fine, "-m", "task_arithmetic", "--base", base, "--align", align, "-o", out, "-q")
        assert code == 0, err
        with safe_open(out / "model.safetensors", "pt") as h:
            dtypes = {h.get_slice(k).get_dtype() for k in h.keys()}
        config = json.loads((out / "config.json").read_text())
        written = {"BF16": "bfloat16", "F32": "float32"}[dtypes.pop()]
        assert not dtypes
        assert config.get("dtype", config.get("torch_dtype")) == written
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert next(loaded.parameters()).dtype == getattr(torch, written)


def test_config_tying_matches_the_weights_written(tmp_path):
    from symmerge.io.stream import write_config

    emb = torch.randn(8, 4)
    for head, tied_expected in ((emb.clone(), True), (emb + 1, False)):
        d = tmp_path / f"d{int(tied_expected)}"
        d.mkdir()
        save_file({"model.embed_tokens.weight": emb, "lm_head.weight": head}, d / "model.safetensors")
        write_config({"model_type": "llama", "tie_word_embeddings": True, "torch_dtype": "bfloat16"}, d, None)
        config = json.loads((d / "config.json").read_text())
        assert config["tie_word_embeddings"] is tied_expected and config["torch_dtype"] == "float32"


def test_outputs_copy_only_the_models_own_files(pair, tmp_path, capsys):
    ref, other = pair
    for model_dir in (ref, other):
        (model_dir / "tokenizer.json").write_text("{}")
        (model_dir / "generation_config.json").write_text("{}")
        old = model_dir / "old-merge"  # an output an older version let a user write inside the input
        old.mkdir()
        (old / "merge.yaml").write_text("x")
        (old / "model.safetensors").write_bytes(b"0" * 1000)
        (model_dir / "checkpoints").mkdir()
        (model_dir / "checkpoints" / "notes.txt").write_text("x")
        (model_dir / "1_Pooling").mkdir()
        (model_dir / "1_Pooling" / "config.json").write_text("{}")
        (model_dir / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": "1_Pooling"}]))
    assert run_cli(capsys, "merge", ref, other, "-m", "linear", "-o", tmp_path / "m", "-q")[0] == 0
    assert run_cli(capsys, "align", ref, other, "-o", tmp_path / "a", "-q")[0] == 0
    for out in (tmp_path / "m", tmp_path / "a" / "scrambled"):
        names = {p.name for p in out.iterdir()}
        assert {"tokenizer.json", "generation_config.json", "modules.json", "1_Pooling", "config.json"} <= names
        assert "old-merge" not in names and "checkpoints" not in names
    assert not (tmp_path / "a" / "scrambled" / "merge.yaml").exists()
