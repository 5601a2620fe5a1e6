"""Per-layer fits as Ray tasks (symmerge.match.distributed): the task functions read their own tensors and return
exactly what the single-process path finds; with Ray (slow: a local instance takes seconds to start), align and
merge --ray give identical results, residual descent and K models included."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import make_model, require_module, run_cli
from safetensors.torch import load_file, save_file

import symmerge
import symmerge.match.distributed as distributed
from symmerge.io import load_state_dict, open_checkpoint
from symmerge.io.stream import LazyState
from symmerge.match import fit_per_layer
from symmerge.match.distributed import TensorFiles, attention_task, ffn_task, group_keys
from symmerge.spec import spec_for

ALL = frozenset({"ffn", "qk", "vo", "scale", "heads"})


def saved_pair(tmp_path: Path, family: str = "llama"):
    model, make_inputs = make_model(family, 0)
    other, _ = make_model(family, 1)
    paths = []
    for name, m in (("ref", model), ("other", other)):
        m.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    return model, make_inputs, paths


def test_task_functions_read_their_tensors_and_match_the_single_process_fit(tmp_path):
    """From files (paths + tensor names) or from an in-memory mapping, each task returns the element
    fit_per_layer finds for its group, bit for bit."""
    _, _, (ref_dir, other_dir) = saved_pair(tmp_path)
    ref, other = (load_state_dict(open_checkpoint(p), file_backed=True) for p in (ref_dir, other_dir))
    spec = spec_for(open_checkpoint(ref_dir).config, ref.keys())
    local = fit_per_layer(ref, other, spec, ALL)
    for group in spec.ffn:
        keys = group_keys(group)
        files = [TensorFiles({k: str(s.tensor_files()[k]) for k in keys}) for s in (ref, other)]
        for source in (files, ({k: ref[k] for k in keys}, {k: other[k] for k in keys})):
            perm, decrease = ffn_task(*source, group, "cpu")
            assert torch.equal(perm, local.transform.ffn[group.name])
            assert decrease == local.details[group.name]["objective_decrease"]
    for group in spec.attention:
        keys = group_keys(group)
        x, details = attention_task(*(TensorFiles({k: str(s.tensor_files()[k]) for k in keys}) for s in (ref, other)), group, ALL, "cpu")
        y = local.transform.heads[group.name]
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("perm", "kv_perm", "qk_rotation", "qk_scale", "vo_rotation", "vo_scale"))
        assert details == local.details[group.name]


def test_a_task_refuses_nan_weights_it_reads(tmp_path):
    _, _, (ref_dir, _) = saved_pair(tmp_path)
    state = load_file(ref_dir / "model.safetensors")
    spec = spec_for(open_checkpoint(ref_dir).config, state.keys())
    group = spec.ffn[0]
    state[group.inputs[0].key][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    files = TensorFiles({k: str(tmp_path / "nan.safetensors") for k in group_keys(group)})
    with pytest.raises(symmerge.SymmergeError, match="holds NaN or Inf"):
        ffn_task(files, files, group, "cpu")


def test_lazy_and_loaded_states_name_their_files(tmp_path):
    _, _, (ref_dir, _) = saved_pair(tmp_path)
    ckpt = open_checkpoint(ref_dir)
    files = LazyState(ckpt).tensor_files()
    assert files == load_state_dict(ckpt, file_backed=True).tensor_files()
    assert all(p.is_absolute() and p.name == "model.safetensors" for p in files.values())
    assert not hasattr(load_state_dict(ckpt), "tensor_files")  # plain loads stay plain dicts


def test_importing_symmerge_does_not_import_ray():
    code = "import sys, symmerge, symmerge.cli, symmerge.merge.engine; assert 'ray' not in sys.modules, 'ray imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ray_missing_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(distributed, "ray", None)
    with pytest.raises(symmerge.SymmergeError, match=r"^--ray needs Ray: pip install 'symmerge\[ray\]'$"):
        distributed.RayExecutor("auto")
    _, _, (ref_dir, other_dir) = saved_pair(tmp_path)
    code, _, err = run_cli(capsys, "align", ref_dir, other_dir, "-o", tmp_path / "out", "--ray", "auto")
    assert code == 2 and err.strip() == "error: --ray needs Ray: pip install 'symmerge[ray]'"
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    """A local TCP port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{closed}", r"^--ray 127\.0\.0\.1:\d+: cannot reach 127\.0\.0\.1:\d+ \(.+\); is the cluster's head started"),
    ("ray://127.0.0.1:{closed}", r"^--ray ray://127\.0\.0\.1:\d+: cannot reach 127\.0\.0\.1:\d+"),
    ("head-node", r"^--ray head-node: give auto, local or HOST:PORT"),
    ("head-node:port", r"^--ray head-node:port: give auto, local or HOST:PORT"),
    ("head-node:0", r"^--ray head-node:0: give auto, local or HOST:PORT"),
])
def test_a_cluster_address_where_nothing_listens_fails_at_once(monkeypatch, address, message):
    """Ray's own connect retries for minutes; the address is tried first, and Ray is never started on a bad one."""
    address = address.format(closed=_closed_port())
    if distributed.ray is not None:
        monkeypatch.setattr(distributed.ray, "is_initialized", lambda: False)
        monkeypatch.setattr(distributed.ray, "init", lambda **kw: pytest.fail("ray.init reached"))
    else:
        monkeypatch.setattr(distributed, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    start = time.monotonic()
    with pytest.raises(symmerge.SymmergeError, match=message):
        distributed.RayExecutor(address)
    assert time.monotonic() - start < 5


def test_a_listening_address_passes_the_check():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.check_reachable(f"127.0.0.1:{server.getsockname()[1]}")


@pytest.fixture(scope="module")
def executor():
    ray = require_module("ray", reason="pip install 'symmerge[ray]' (scripts/setup installs it)")
    yield distributed.RayExecutor("local", num_cpus=2)
    ray.shutdown()


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("symmetries", ["all", "all,residual"])
def test_align_on_ray_equals_the_single_process_result(executor, tmp_path, symmetries):
    """File-backed states (tasks read the safetensors) and, in the residual descent, in-memory states (the
    object store)."""
    model, _, (ref_dir, other_dir) = saved_pair(tmp_path)
    ref, other = (load_state_dict(open_checkpoint(p), file_backed=True) for p in (ref_dir, other_dir))
    here = symmerge.align(ref, other, config=model.config, symmetries=symmetries)
    there = symmerge.align(ref, other, config=model.config, symmetries=symmetries, ray=executor)
    assert _equal(here.state_dict, there.state_dict)
    plain = symmerge.align(dict(ref), dict(other), config=model.config, symmetries=symmetries, ray=executor)  # object store only
    assert _equal(here.state_dict, plain.state_dict)


@pytest.mark.slow
@pytest.mark.parametrize("symmetries", ["all", "all,residual"])
def test_cli_align_and_merge_of_three_models_on_ray_equal_the_local_run(executor, tmp_path, capsys, symmetries):
    model, _, (ref_dir, other_dir) = saved_pair(tmp_path)
    third, _ = make_model("llama", 2)
    third.save_pretrained(tmp_path / "third")
    for name, extra in (("here", []), ("ray", ["--ray", "local"])):
        code, _, err = run_cli(capsys, "align", ref_dir, other_dir, tmp_path / "third", "-o", tmp_path / f"align-{name}", "-s", symmetries, "-q", *extra)
        assert code == 0, err
        code, _, err = run_cli(capsys, "merge", ref_dir, other_dir, tmp_path / "third", "--method", "linear", "-s", symmetries,
                               "-o", tmp_path / f"merge-{name}", "-q", *extra)
        assert code == 0, err
    for kind in ("align-{}/other", "align-{}/third", "merge-{}"):
        a = load_file(tmp_path / kind.format("here") / "model.safetensors")
        b = load_file(tmp_path / kind.format("ray") / "model.safetensors")
        assert _equal(a, b), kind
