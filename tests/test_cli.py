"""The symmerge command: success path, and every bad input as a one-line error with no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli_env, expect_cli_error, make_model, max_output_diff, run_cli, save_checkpoint, save_model
from safetensors.torch import load_file

import symmerge
from symmerge.cli import quiet_bars_in_logs
from symmerge.match import state_norm
from symmerge.spec.families import SUPPORTED_FAMILIES


@pytest.fixture
def pair(tmp_path):
    """A reference GPT-2 directory and a scrambled copy of it."""
    model, make_inputs = make_model("gpt2")
    ref = save_model(model, tmp_path / "ref")
    on_disk = load_file(ref / "model.safetensors")
    scrambled = symmerge.apply_random_symmetry(on_disk, config=model.config, seed=5)
    other = save_model(model, tmp_path / "scrambled", scrambled)
    return ref, other, model, make_inputs


def test_align_writes_loadable_aligned_models(pair, tmp_path, capsys):
    ref, other, model, make_inputs = pair
    code, out, err = run_cli(capsys, "align", ref, other, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    aligned_dir = tmp_path / "out" / "scrambled"
    assert (aligned_dir / "config.json").is_file() and (aligned_dir / "model.safetensors").is_file()
    aligned = type(model).from_pretrained(aligned_dir).eval()
    original = type(model).from_pretrained(ref).eval()
    assert symmerge.state_distance(original.state_dict(), aligned.state_dict()) <= 1e-5 * state_norm(original.state_dict())
    assert max_output_diff(model, original.state_dict(), aligned.state_dict(), make_inputs) <= 1e-5
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert report["models"]["scrambled"]["relative_after"] <= 1e-5
    assert "scrambled" in out and "→" in out
    assert not list(tmp_path.glob(".out.partial-*"))


def test_align_with_a_subset_of_symmetries(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    code, out, _ = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-s", "ffn", "-q")
    assert code == 0
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert report["symmetries"] == ["ffn"]
    assert report["models"]["scrambled"]["relative_after"] > 1e-3  # heads are still scrambled


@pytest.mark.parametrize("family,symmetries", [("bert", "auto"), ("bert", "ffn,qk,vo,scale"), ("gpt2", "all")])
def test_align_reports_the_distances_of_the_model_it_wrote(family, symmetries, tmp_path, capsys):
    """The CLI writes a lazily aligned model's tensors in the pass that measures the report's distances (each computed
    once for both): the report's distances after alignment, whole model and per group, are those of the file."""
    from symmerge.match.objective import squared_distances
    from symmerge.spec import spec_for

    ref_model, _ = make_model(family, seed=0)
    ref = save_model(ref_model, tmp_path / "ref")
    other = save_model(make_model(family, seed=1)[0], tmp_path / "other")
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-s", symmetries, "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())["models"]["other"]
    written, reference = load_file(tmp_path / "out" / "other" / "model.safetensors"), load_file(ref / "model.safetensors")
    assert written.keys() == load_file(other / "model.safetensors").keys()
    after = squared_distances(written, reference)
    assert report["distance_after"] == pytest.approx(sum(after.values()) ** 0.5, rel=1e-12)
    assert report["distance_after"] < 0.99 * report["distance_before"]  # the alignment moved the model
    spec = spec_for(ref_model.config, reference.keys())
    groups = {g.name: {s.key for s in g.slots()} for g in spec.groups()}
    for group in report["groups"]:
        assert group["distance_after"] == pytest.approx(sum(after[k] for k in groups[group["name"]]) ** 0.5, rel=1e-12), group["name"]


def test_inspect(pair, capsys):
    ref, _, _, _ = pair
    code, out, _ = run_cli(capsys, "inspect", ref)
    assert code == 0
    assert "gpt2" in out and "S_192" in out and "O(12)" in out and "parameters" in out




def test_different_architectures_name_the_value(pair, tmp_path, capsys):
    ref, _, _, _ = pair
    import transformers

    bigger = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=64, n_positions=32))
    save_model(bigger, tmp_path / "deeper")
    expect_cli_error(capsys, "has layers 3, the reference has 2", "align", ref, tmp_path / "deeper", "-o", tmp_path / "out")
    wider_heads = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=48, n_head=6, vocab_size=64, n_positions=32))
    save_model(wider_heads, tmp_path / "heads")
    expect_cli_error(capsys, "head dim 8, the reference has 12", "align", ref, tmp_path / "heads", "-o", tmp_path / "out")
    bert, _ = make_model("bert")
    save_model(bert, tmp_path / "bert")
    expect_cli_error(capsys, "has family bert, the reference has gpt2", "align", ref, tmp_path / "bert", "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_lists_supported(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "t5"
    (other / "config.json").write_text(json.dumps(config))
    err = expect_cli_error(capsys, "model_type 't5' is not supported", "align", ref, other, "-o", tmp_path / "out")
    assert ", ".join(SUPPORTED_FAMILIES) in err and "relative attention bias" in err  # the list comes from the registry


def test_missing_and_corrupt_files(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    expect_cli_error(capsys, "does not exist", "align", ref, tmp_path / "nope", "-o", tmp_path / "out")
    (other / "config.json").unlink()
    expect_cli_error(capsys, "has no config.json", "align", ref, other, "-o", tmp_path / "out")
    broken = save_model(make_model("gpt2")[0], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_cli_error(capsys, "corrupt or truncated", "align", ref, broken, "-o", tmp_path / "out")
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    expect_cli_error(capsys, "corrupt or truncated", "inspect", broken)
    (broken / "config.json").write_text("{not json")
    expect_cli_error(capsys, "is not valid JSON", "inspect", broken)
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_without_partial_output(pair, tmp_path, capsys):
    ref, other, model, _ = pair
    state = load_file(other / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    bad = save_model(model, tmp_path / "bad", state)
    # the good model is processed first, then the bad one fails: nothing may be left behind
    expect_cli_error(capsys, "holds NaN or Inf", "align", ref, other, bad, "-o", tmp_path / "out", "-q")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_refused_unless_forced(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    expect_cli_error(capsys, "already exists", "align", ref, other, "-o", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    # --force replaces only earlier symmerge outputs (or empty folders): a folder of the user's stays
    expect_cli_error(capsys, "is not a symmerge output", "align", ref, other, "-o", tmp_path / "out", "--force", "-q")
    assert (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / "keep.txt").unlink()
    code, _, _ = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "--force", "-q")
    assert code == 0 and (tmp_path / "out" / "scrambled" / "model.safetensors").exists()
    code, _, _ = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "--force", "-q", "-s", "ffn")
    assert code == 0 and json.loads((tmp_path / "out" / "alignment.json").read_text())["symmetries"] == ["ffn"]


def test_pickle_weights_need_allow_pickle(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    state = load_file(other / "model.safetensors")
    (other / "model.safetensors").unlink()
    torch.save(state, other / "pytorch_model.bin")
    expect_cli_error(capsys, "--allow-pickle", "align", ref, other, "-o", tmp_path / "out")
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "--allow-pickle", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "scrambled" / "model.safetensors").exists()


def test_unknown_symmetry(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    err = expect_cli_error(capsys, "unknown symmetry 'rope'", "align", ref, other, "-o", tmp_path / "out", "-s", "ffn,rope")
    assert "none or auto" in err  # the default is a valid choice too: the message once offered only "all or none"
    expect_cli_error(capsys, "auto stands alone", "align", ref, other, "-o", tmp_path / "out", "-s", "all,auto")


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "symmerge.cli", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == f"error: {tmp_path / 'missing'} does not exist"
    proc = subprocess.run([sys.executable, "-m", "symmerge.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "align" in proc.stdout and "inspect" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "symmerge.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"symmerge {symmerge.__version__}\n"


def test_console_script_exits_fast_after_a_success_with_output_flushed_and_exit_handlers_run():
    """run() skips the interpreter's teardown after a success (os._exit), so it must flush what the command printed
    and run atexit handlers itself; a failure exits the ordinary way with its code."""
    probe = ("import atexit, sys, symmerge.cli\n"
             "atexit.register(lambda: print('exit handler ran'))\n"
             "sys.argv = ['symmerge'] + sys.argv[1:]\n"
             "symmerge.cli.run()\n")
    ok = subprocess.run([sys.executable, "-c", probe, "methods"], capture_output=True, text=True, env=cli_env())
    assert ok.returncode == 0, ok.stderr
    assert "ties" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    bad = subprocess.run([sys.executable, "-c", probe, "inspect", "/no/such/model"], capture_output=True, text=True, env=cli_env())
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "exit handler ran" in bad.stdout


def test_align_with_residual_writes_models_in_the_reference_parametrisation(tmp_path, capsys):
    """The aligned model is unfolded with the reference's own norm gains: it equals the reference it was scrambled
    from (no separate folded reference is written), computes what the scrambled copy computes, and averaging it
    with the reference as it is, is the aligned merge."""
    model, make_inputs = make_model("gpt2", 4)  # tied LM head: folding unties it
    ref = save_model(model, tmp_path / "ref")
    scrambled = symmerge.apply_random_symmetry(load_file(ref / "model.safetensors"), config=model.config, symmetries="all,residual", seed=6)
    other = save_model(model, tmp_path / "other", scrambled)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-s", "all,residual", "-q")
    assert code == 0, err
    assert not (tmp_path / "out" / "reference-folded").exists()
    aligned = type(model).from_pretrained(tmp_path / "out" / "other").eval()
    original = type(model).from_pretrained(ref).eval()
    assert not aligned.config.tie_word_embeddings
    assert symmerge.state_distance(original.state_dict(), aligned.state_dict()) <= 1e-5 * state_norm(original.state_dict())
    assert max_output_diff(aligned, {k: v.clone() for k, v in original.state_dict().items()}, aligned.state_dict(), make_inputs) <= 1e-5
    code, _, err = run_cli(capsys, "merge", ref, tmp_path / "out" / "other", "--method", "linear", "-s", "none", "-o", tmp_path / "avg", "-q")
    assert code == 0, err
    merged = type(model).from_pretrained(tmp_path / "avg").eval()
    assert max_output_diff(merged, {k: v.clone() for k, v in original.state_dict().items()}, merged.state_dict(), make_inputs) <= 1e-5


def test_max_seconds_bounds_the_residual_descent_on_align_and_merge(tmp_path, capsys):
    """--max-seconds reaches the descent from align, from merge's short form and from a recipe's alignment block
    (one round within a zero budget; the rounds' seconds are reported), and is refused beside a recipe."""
    model, _ = make_model("llama", 2)
    ref = save_model(model, tmp_path / "ref")
    scrambled = symmerge.apply_random_symmetry(load_file(ref / "model.safetensors"), config=model.config, symmetries="all,residual", seed=8)
    other = save_model(model, tmp_path / "other", scrambled)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-s", "all,residual", "--max-seconds", "0", "-q")
    assert code == 0, err
    residual = json.loads((tmp_path / "out" / "alignment.json").read_text())["models"]["other"]["groups"][-1]["details"]
    assert len(residual["round_seconds"]) == 1 and residual["stopped_by_max_seconds"]
    code, _, err = run_cli(capsys, "merge", ref, other, "--method", "linear", "-s", "all,residual", "--max-seconds", "0", "-o", tmp_path / "m1", "-q")
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{{model: {ref}}}, {{model: {other}}}]\nmerge_method: linear\n"
                      "alignment: {symmetries: 'all,residual', max_seconds: 0}\n")
    code, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "m2", "-q")
    assert code == 0, err
    m1, m2 = load_file(tmp_path / "m1" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    code, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "m3", "--max-seconds", "5", "-q")
    assert code == 2 and "--max-seconds cannot be combined with a recipe" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    expect_cli_error(capsys, "--device cuda: no CUDA device is available", "align", ref, other, "-o", tmp_path / "out", "--device", "cuda")
    assert not (tmp_path / "out").exists()
    expect_cli_error(capsys, "--device cuda: no CUDA device is available", "merge", ref, other, "--method", "linear", "-o", tmp_path / "m",
                     "--device", "cuda")
    assert not (tmp_path / "m").exists()


def test_device_cpu_and_auto_give_the_default_result(pair, tmp_path, capsys):
    ref, other, _, _ = pair
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto"])):
        code, _, err = run_cli(capsys, "merge", ref, other, "--method", "linear", "-o", tmp_path / name, "-q", *extra)
        assert code == 0, err
    if not torch.cuda.is_available():  # auto is the CPU here
        merged = [load_file(tmp_path / n / "model.safetensors") for n in ("default", "cpu", "auto")]
        assert all(torch.equal(merged[0][k], m[k]) for m in merged[1:] for k in merged[0])


_LARGE_ALLOCATION = '''
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
from symmerge.allocator import keep_freed_buffers
print(keep_freed_buffers() if sys.argv[1] == "set" else "-")
import torch
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
x = torch.empty(100 << 20, dtype=torch.uint8)
print("mmapped" if libc.mallinfo2().hblkhd >= 100 << 20 else "heap")
'''


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc (Linux); elsewhere keep_freed_buffers does nothing")
@pytest.mark.parametrize("how,env,expected", [("set", {}, "True heap"), ("unset", {}, "- mmapped"),
                                              ("set", {"MALLOC_TRIM_THRESHOLD_": "131072"}, "False mmapped")])
def test_the_command_line_keeps_large_buffers_in_the_heap(how, env, expected):
    """symmerge's console script raises glibc's mmap threshold before torch is imported: a 100 MB tensor then comes
    from the heap (reused when freed) instead of a fresh mmap whose pages the kernel faults in and zeroes again —
    unless the user configured malloc through its environment variables."""
    out = subprocess.run([sys.executable, "-c", _LARGE_ALLOCATION, how], env={**cli_env(), **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert " ".join(out) == expected


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


_BAR_REDRAW = """
import os, sys
from symmerge.cli import quiet_bars_in_logs
quiet_bars_in_logs()  # as the console script does, before any command imports tqdm (which reads TQDM_* on import)
from tqdm.auto import tqdm
with open(os.devnull, "w") as sink, tqdm(total=1, file=sink) as bar:
    print(bar.mininterval)
"""


@pytest.mark.parametrize("tty, user, expected", [(False, None, "30"), (True, None, None), (False, "0.5", "0.5")])
def test_progress_bars_written_to_a_log_redraw_rarely(monkeypatch, tty, user, expected):
    """Where stderr is not a terminal (a log file, CI), tqdm's carriage-return redraws pile up on one line (58 KB for
    the demo's zoo training): the command line makes bars redraw every 30 s there, in a terminal nothing changes,
    and the user's own TQDM_MININTERVAL wins. In a fresh interpreter whose stderr is a pipe, tqdm's bars then take
    that interval (0.1 s is tqdm's own default)."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    if user is not None:
        monkeypatch.setenv("TQDM_MININTERVAL", user)
    quiet_bars_in_logs(_Stream(tty))
    assert os.environ.get("TQDM_MININTERVAL") == expected
    env = {k: v for k, v in cli_env().items() if k != "TQDM_MININTERVAL"} | ({"TQDM_MININTERVAL": user} if user else {})
    shown = subprocess.run([sys.executable, "-c", _BAR_REDRAW], env=env, capture_output=True, text=True, check=True).stdout
    assert float(shown) == float(user or 30)


def test_align_writes_a_fine_tune_as_it_is_and_says_why(tmp_path, capsys):
    """Issue 10 item 4 from the command line: a fine-tune of the reference permutes nothing and its rotations gain
    less than MIN_GAIN, so the written model is the fine-tune bit for bit; alignment.json and the table say why."""
    model, _ = make_model("llama", seed=0)
    ref = save_model(model, tmp_path / "ref")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    tuned = save_model(model, tmp_path / "tuned")
    code, out, err = run_cli(capsys, "align", ref, tuned, "-o", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())["models"]["tuned"]
    assert report["near_identity"]["applied"] is False and 0 < report["near_identity"]["gain"] <= 0.05
    assert report["distance_after"] == report["distance_before"]
    assert "not applied" in out
    written, original = load_file(tmp_path / "out" / "tuned" / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


@pytest.mark.parametrize("family", ["gpt_neox", "stablelm", "phi", "opt", "granite", "olmo", "olmo2", "gptj", "cohere"])
def test_align_and_merge_partial_rotary_families(family, tmp_path, capsys):
    """GPT-NeoX (Pythia; embed_out on disk, Q|K|V fused per head), StableLM and Phi from the command line (and OPT,
    Granite, OLMo, OLMo-2, GPT-J, Cohere: tied heads, learned positions, scalar multipliers, norms without weights or
    biases, Q/K row norms, residual permutations): align
    recovers a copy scrambled by every class they offer (residual included), and merging the reference with that copy
    gives a model that computes what the reference computes."""
    model, make_inputs = make_model(family)
    ref = save_model(model, tmp_path / "ref")
    on_disk = load_file(ref / "model.safetensors")
    scrambled = symmerge.apply_random_symmetry(on_disk, config=model.config, symmetries="all,residual", seed=5)
    other = save_model(model, tmp_path / "scrambled", scrambled)
    code, _, err = run_cli(capsys, "align", ref, other, "-o", tmp_path / "out", "-s", "all,residual", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())["models"]["scrambled"]
    assert report["relative_before"] > 0.5 and report["relative_after"] <= 1e-5
    aligned = type(model).from_pretrained(tmp_path / "out" / "scrambled").eval()
    assert max_output_diff(model, dict(model.state_dict()), dict(aligned.state_dict()), make_inputs) <= 1e-4
    code, _, err = run_cli(capsys, "merge", ref, other, "--method", "linear", "-s", "all,residual", "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    merged = type(model).from_pretrained(tmp_path / "merged").eval()
    assert max_output_diff(model, dict(model.state_dict()), dict(merged.state_dict()), make_inputs) <= 1e-4


def test_iterative_merge_reports_distances_to_the_reference(tmp_path, capsys):
    """merge --iterative printed (and wrote into the model card) each model's distance to the mean of the others it
    was last aligned to, under the heading "distance to reference": llama1 51.4 -> 43.3 where the star said 56.7 ->
    47.8. Both now measure to the reference: the distances before are the star's, and the card says the same."""
    paths = [save_model(make_model("gpt2", seed)[0], tmp_path / f"m{seed}") for seed in range(3)]

    def distances(*flags):
        code, out, err = run_cli(capsys, "merge", *paths, "--method", "linear", "-s", "all", "-o", tmp_path / flags[0], "-q", *flags[1:])
        assert code == 0, err
        rows = [line.split() for line in out.splitlines() if "distance to reference" in line]
        return {r[0]: (float(r[-3]), float(r[-1])) for r in rows}, (tmp_path / flags[0] / "README.md").read_text()

    star, _ = distances("star")
    many, card = distances("iterative", "--iterative")
    assert {"m1", "m2"} <= set(star) and {"m1", "m2"} <= set(many)
    assert all(many[m][0] == pytest.approx(star[m][0], rel=1e-4) for m in ("m1", "m2"))
    assert all(f"| {m} | {many[m][0]:.5g} | {many[m][1]:.5g} |" in card for m in ("m1", "m2"))


@pytest.mark.parametrize("config", [{"model_type": "falcon"}, {"model_type": "t5"}])
def test_inspect_says_a_model_does_not_align_but_merges(tmp_path, capsys, config):
    """The README answers "does symmerge align this family?" with `symmerge inspect`; for a family without a spec it
    failed like a broken file (error:, exit 2), though merge merges such a model without alignment."""
    model = save_checkpoint(tmp_path / "m", {"model.layers.0.w.weight": torch.ones(4, 4)}, config)
    code, out, err = run_cli(capsys, "inspect", model)
    assert code == 0, err
    assert f"{config['model_type']}, 16 parameters" in out and "is not supported" in out and "merge merges it without alignment" in out
    expect_cli_error(capsys, "is not supported", "align", model, model, "-o", tmp_path / "out")
