"""Reliability: outputs never destroy inputs, interrupts clean up, races are refused, and every bad input a user
can give is a one-line ``error:`` (exit 2), never an ``internal error`` (exit 1, reserved for bugs)."""

from __future__ import annotations

import json
import os
import pickle
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
from symmerge.io import open_checkpoint
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


def test_keyboard_interrupt_inside_the_framework_is_not_success(pair, tmp_path, capsys, monkeypatch):
    """typer turns a KeyboardInterrupt into a return value of 130 in non-standalone mode: main() must honour it."""
    ref, other = pair
    import symmerge.io as io

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "load_state_dict", interrupted)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-q")
    assert code == 130 and err.strip() == "aborted"
    assert not (tmp_path / "out").exists() and stray_folders(tmp_path) == []


def test_interrupt_during_the_final_swap_is_deferred(tmp_path):
    """The swap of a forced output happens with SIGINT/SIGTERM held: either the old or the new output, never none."""
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "v").write_text("2")
        os.kill(os.getpid(), 0)  # (no signal: the blocking itself is what is exercised)
    assert (out / "v").read_text() == "2" and stray_folders(tmp_path) == []


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
