"""Bounded memory: the residual class streamed unit by unit gives what the whole-model, in-memory path gives.

Equality is bitwise for applied tensors (the same operations run on the same tensors, in the same order, only on
fewer of them at a time). The residual correlation and distances are compared to float tolerance: the streamed
path sums the per-tensor terms in unit order rather than the state dict's order, and float addition is not
associative (float64 there: ~1e-12 relative)."""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
from collections.abc import Mapping

import pytest
import torch
from conftest import make_model, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import symmerge
from symmerge.errors import SymmergeError
from symmerge.groups import apply_transform, parse_symmetries
from symmerge.groups.residual import can_unfold, fold_norms, residual_correlation, unfold_norms, with_untied_head
from symmerge.groups.stream import TransformedState
from symmerge.io import open_checkpoint
from symmerge.io.stream import LazyState, ShardWriter, computed_ahead, save_streamed
from symmerge.match import fit_with_residual, state_distance
from symmerge.spec import spec_for

# pre-LN LayerNorm (gpt2, vit), RMSNorm (llama, qwen2, phi3: fused tensors), gain offset and tied head (gemma),
# sandwich norms (gemma2: permutations), post-LN (bert-cls, deberta-v2-cls: permutations), partial rotary (gpt_neox: Q|K|V
# fused per head, parallel residual; stablelm; phi: one norm read by attention and MLP), learned positions and a tied head
# (opt), scalar multipliers (granite), non-parametric LayerNorms (olmo), no pre-norms and Q/K row norms (olmo2), one
# ln_1 beside bias-free q/k/v (gptj), bias-free LayerNorm (cohere)
RESIDUAL_FAMILIES = ("llama", "gpt2", "gemma", "gemma2", "qwen2", "phi3", "bert-cls", "deberta-v2-cls", "vit", "gpt_neox", "stablelm", "phi",
                     "opt", "granite", "olmo", "olmo2", "gptj", "cohere")


def _pair(family: str):
    a, _ = make_model(family, 0)
    b, _ = make_model(family, 1)
    sa, sb = dict(a.state_dict()), dict(b.state_dict())
    if getattr(a.config, "tie_word_embeddings", False) and hasattr(a, "lm_head"):  # a checkpoint on disk stores no tied head
        for s in (sa, sb):
            s.pop("lm_head.weight", None)
    return a, sa, sb


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_streamed_residual_equals_in_memory(family):
    model, sa, sb = _pair(family)
    spec = spec_for(model.config, sa.keys())
    assert spec.residual is not None, family
    residual = spec.residual
    fit = fit_with_residual(sa, sb, spec, parse_symmetries("all,residual"), max_iter=3)
    t = fit.transform
    # the objective the streamed descent reports is the in-memory distance of the element it returns
    in_memory = apply_transform(sb, spec, t)  # folds, applies Q, then every per-layer element, on whole dicts
    folded_ref = fold_norms(sa, residual)
    assert math.isclose(state_distance(in_memory, folded_ref), fit.history[-1], rel_tol=1e-5)
    # the streamed application (unit by unit, from the raw state) is the whole-model one, tensor for tensor
    streamed = TransformedState(sb, spec, t, fold=True)
    assert set(streamed) == set(in_memory)
    for k in in_memory:
        assert torch.equal(streamed[k], in_memory[k]), k
    if can_unfold(sa, residual):
        whole = unfold_norms(in_memory, residual, sa)
        lazy = TransformedState(sb, spec, t, fold=True, unfold_with=sa)
        for k in whole:
            assert torch.equal(lazy[k], whole[k]), k
    # the correlation accumulated tensor by tensor from lazily folded states is the whole-model one
    per_layer = type(t)(ffn=t.ffn, heads=t.heads)
    m_stream = residual_correlation(TransformedState(sb, spec, per_layer, fold=True), TransformedState(sa, spec, fold=True), residual)
    m_memory = residual_correlation(apply_transform(fold_norms(sb, residual), spec, per_layer), folded_ref, residual)
    torch.testing.assert_close(m_stream, m_memory, rtol=1e-9, atol=1e-9)


def test_streamed_views_hold_few_units():
    model, sa, sb = _pair("llama")
    spec = spec_for(model.config, sa.keys())
    view = TransformedState(sb, spec, fold=True, cache=2)
    for k in view:
        view[k]
    assert len(view._cache) <= 2 and len(view.units()) > 4


def test_streamed_residual_merge_equals_in_memory(tmp_path, capsys):
    """``merge -s all,residual`` (fit and application streamed from mmap) equals the average of the reference with the
    model aligned in memory by :func:`symmerge.align` (whole dicts: fold, apply, unfold)."""
    model_a, _ = make_model("llama", 0)
    model_b, _ = make_model("llama", 1)
    model_a.save_pretrained(tmp_path / "a", max_shard_size="40KB")  # sharded
    model_b.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", tmp_path / "a", tmp_path / "b", "--method", "linear", "-s", "all,residual", "-o", out, "-q")
    assert code == 0, err
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    ref = dict(LazyState(open_checkpoint(tmp_path / "a")))
    other = dict(LazyState(open_checkpoint(tmp_path / "b")))
    aligned = symmerge.align(ref, other, symmetries="all,residual", config=model_a.config)
    partner = with_untied_head(ref, aligned.spec.residual)
    assert set(merged) == set(aligned.state_dict)
    for k, v in aligned.state_dict.items():
        expected = (partner[k].float() * 0.5 + v.float() * 0.5).to(v.dtype)
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6, msg=k)


def test_streamed_residual_needs_residual_group():
    bert, _ = make_model("bert", 0)  # a bare encoder: no head reads the stream
    state = dict(bert.state_dict())
    with pytest.raises(SymmergeError, match="residual-stream alignment is not available"):
        TransformedState(state, spec_for(bert.config, state.keys()), fold=True)


# tied head and gain offset; pre-LN; post-LN; on-disk head name (embed_out) and Q|K|V fused per head; tied head and
# learned positions under a nested prefix (opt); a norm bias kept for bias-free readers (gptj); Q/K row norms (olmo2)
@pytest.mark.parametrize("family", ["gemma", "gpt2", "bert-cls", "gpt_neox", "opt", "gptj", "olmo2"])
def test_streamed_align_cli_equals_in_memory(tmp_path, capsys, family):
    """``align -s all,residual`` reads from mmap and writes unit by unit: the files equal :func:`symmerge.align` on
    whole state dicts, bit for bit."""
    model_a, _ = make_model(family, 0)
    model_b, _ = make_model(family, 1)
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    code, _, err = run_cli(capsys, "align", tmp_path / "a", tmp_path / "b", "-s", "all,residual", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    written = load_file(tmp_path / "out" / "b" / "model.safetensors")
    ref = load_file(tmp_path / "a" / "model.safetensors")
    other = load_file(tmp_path / "b" / "model.safetensors")
    expected = symmerge.align(ref, other, symmetries="all,residual", config=model_a.config).state_dict
    assert set(written) == set(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k


# ------------------------------------------------------------------------------------------- ShardWriter


def _writer_tensors() -> dict[str, torch.Tensor]:
    """Random tensors of every dtype safetensors and this torch share, plus a 0-size tensor, a scalar and a
    non-contiguous view, named out of safetensors' order (which sorts by dtype, then by name)."""
    g = torch.Generator().manual_seed(0)
    out = {
        "z.f32": torch.randn(5, 3, generator=g),
        "a.bf16": torch.randn(7, 4, generator=g).to(torch.bfloat16),
        "m.f16": torch.randn(3, generator=g).to(torch.float16),
        "b.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "c.i64": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "d.i32": torch.randint(-(2**30), 2**30, (4, 1), generator=g, dtype=torch.int32),
        "e.i16": torch.randint(-(2**14), 2**14, (3,), generator=g, dtype=torch.int16),
        "f.i8": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "g.u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "h.bool": torch.rand(7, generator=g) > 0.5,
        "i.c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "y.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "x.scalar": torch.tensor(3.5),
        "w.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous: written in C order
        "f.second": torch.randn(3, generator=g),  # same dtype as z.f32: name order decides
    }
    for name, attr in (("u16", "uint16"), ("u32", "uint32"), ("u64", "uint64"), ("f8a", "float8_e4m3fn"), ("f8b", "float8_e5m2"),
                       ("f8c", "float8_e4m3fnuz"), ("f8d", "float8_e5m2fnuz")):
        if hasattr(torch, attr):
            dt = getattr(torch, attr)
            raw = torch.randint(0, 256, (4 * torch.tensor([], dtype=dt).element_size(),), generator=g, dtype=torch.uint8)
            out[f"n.{name}"] = raw.view(dt)
    return out


def _write(tmp_path, tensors, max_shard_bytes=10**9):
    tmp_path.mkdir(exist_ok=True)
    writer = ShardWriter(tmp_path, max_shard_bytes)
    for k, v in tensors.items():
        writer.add(k, v)
    return writer.close()


def test_shard_writer_is_byte_identical_to_save_file(tmp_path):
    tensors = _writer_tensors()
    [written] = _write(tmp_path / "ours", tensors)
    assert written.name == "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["model.safetensors"]  # no data file left behind
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, reference, metadata={"format": "pt"})
    assert written.read_bytes() == reference.read_bytes()
    with safe_open(written, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    # negative control: the comparison sees one changed entry
    changed = dict(tensors, **{"a.bf16": tensors["a.bf16"].clone().index_fill_(0, torch.tensor([2]), 1.0)})
    [other] = _write(tmp_path / "changed", changed)
    assert other.read_bytes() != reference.read_bytes()


def test_shard_writer_shards_and_index(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=g).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(7)}
    files = _write(tmp_path / "out", tensors, max_shard_bytes=700)  # 200 or 400 bytes each: one or two a shard
    n = len(files)
    assert n > 2 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*(f.name for f in files), "model.safetensors.index.json"])
    for f in files:  # each shard: what save_file writes for the tensors the index puts there
        keys = [k for k, shard in index["weight_map"].items() if shard == f.name]
        reference = tmp_path / f"ref-{f.name}"
        save_file({k: tensors[k] for k in keys}, reference, metadata={"format": "pt"})
        assert f.read_bytes() == reference.read_bytes()


def test_shard_writer_holds_no_tensor(tmp_path):
    """At most the tensor being added is in memory: the writer keeps no reference to any tensor it was given."""
    writer = ShardWriter(tmp_path, 10**9)
    refs = []
    for i in range(3):
        t = torch.randn(100, 100)
        refs.append(weakref.ref(t))
        writer.add(f"t{i}", t)
        del t
    assert all(r() is None for r in refs)
    writer.close()
    with pytest.raises(SymmergeError, match="written twice"):
        writer.add("t1", torch.zeros(1))


def test_shard_writer_copies_without_copy_file_range(tmp_path, monkeypatch):
    """Where the kernel copy is missing or refuses the files, the copy through memory writes the same bytes."""
    tensors = _writer_tensors()
    [kernel] = _write(tmp_path / "kernel", tensors)

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    [refused] = _write(tmp_path / "refused", tensors)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    missing = _write(tmp_path / "missing", tensors, max_shard_bytes=1)  # one tensor a shard, the 0-byte one included
    assert refused.read_bytes() == kernel.read_bytes()
    assert len(missing) == len(tensors)
    for f in missing:
        [(k, v)] = load_file(f).items()
        assert f.read_bytes() == save_file_bytes({k: tensors[k]}, tmp_path / "ref.safetensors"), k


def save_file_bytes(tensors: dict[str, torch.Tensor], path) -> bytes:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path.read_bytes()


class _Recording(Mapping):
    """A state whose reads are logged with the reading thread (what a TransformedState's cache sees)."""

    def __init__(self, n: int):
        self.values = {f"t{i}": torch.full((3,), float(i)) for i in range(n)}
        self.reads: list[tuple[str, int]] = []

    def __getitem__(self, key):
        self.reads.append((key, threading.get_ident()))
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


def test_computed_ahead_reads_every_value_once_in_order_on_one_worker_thread_at_most_depth_ahead():
    state = _Recording(7)
    seen = []
    for key, value in computed_ahead(state, state.__getitem__, depth=2):
        assert len(state.reads) <= len(seen) + 3  # this one and at most 2 ahead
        seen.append(key)
        assert torch.equal(value, state.values[key])
    assert seen == list(state.values) and [k for k, _ in state.reads] == seen
    threads = {t for _, t in state.reads}
    assert len(threads) == 1 and threading.get_ident() not in threads  # negative control: a plain loop reads on this thread


def test_computed_ahead_stops_reading_when_the_consumer_stops():
    state = _Recording(10)
    stream = computed_ahead(state, state.__getitem__, depth=2)
    next(stream)
    stream.close()
    assert len(state.reads) <= 4


def test_save_streamed_writes_what_save_file_writes_for_an_aligned_state(tmp_path):
    """The written file is byte for byte safetensors' own for the same tensors, read ahead through a lazily aligned state."""
    ref, other = make_model("bert", 0)[0], make_model("bert", 1)[0]
    state = other.state_dict()
    aligned = symmerge.align(ref, other, symmetries="ffn,qk,vo,scale")
    spec = spec_for(other.config, state.keys())
    lazy = TransformedState(state, spec, aligned.transform)
    (tmp_path / "streamed").mkdir()
    save_streamed(lazy, tmp_path / "streamed")
    save_file({k: aligned.state_dict[k].contiguous() for k in lazy}, tmp_path / "whole.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


@pytest.mark.parametrize("symmetries,lazy", [("all", True), ("all", False), ("auto", True)])  # report pass; in memory; auto's candidates
def test_align_hands_its_sink_every_aligned_tensor_once_in_order(tmp_path, symmetries, lazy):
    """``align(..., sink=...)`` gives the sink each tensor of ``state_dict`` once, in its order, with its value:
    in the report's pass over a lazily aligned model, and afterwards where the report is not one pass (GPT-2's
    ``auto`` aligns two candidates and keeps one)."""
    model_a, _ = make_model("gpt2", 0)
    model_b, _ = make_model("gpt2", 1)
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    ckpt_a, ckpt_b = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")
    ref, other = (LazyState(ckpt_a), LazyState(ckpt_b)) if lazy else (load_file(ckpt_a.weight_files[0]), load_file(ckpt_b.weight_files[0]))
    received = []
    result = symmerge.align(ref, other, symmetries=symmetries, config=model_a.config, sink=lambda k, t: received.append((k, t)))
    assert [k for k, _ in received] == list(result.state_dict)
    for k, t in received:
        assert torch.equal(t, result.state_dict[k]), k
    if symmetries == "auto":
        assert result.report.matching["auto"]["kept"] in ("all", "all,residual")


class _RestartableSink:
    """A sink with ``restart()`` (as a ShardWriter): what it holds now, and how often each pass fed it."""

    def __init__(self):
        self.received, self.restarts = [], 0

    def __call__(self, key, tensor):
        self.received.append((key, tensor.clone()))

    def restart(self):
        self.received, self.restarts = [], self.restarts + 1


def _llama_fine_tune_pair(tmp_path):
    model, _ = make_model("llama", 0)
    ref = model.state_dict()
    g = torch.Generator().manual_seed(5)
    fine_tune = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in ref.items()}
    model.save_pretrained(tmp_path / "a")
    model.load_state_dict(fine_tune)
    model.save_pretrained(tmp_path / "ft")
    return model.config, LazyState(open_checkpoint(tmp_path / "a")), LazyState(open_checkpoint(tmp_path / "ft"))


def test_auto_feeds_a_restartable_sink_in_the_fine_tunes_report_pass(tmp_path, monkeypatch):
    """``auto`` on a fine-tune (its per-layer element permutes nothing): a restartable sink is fed in the per-layer
    report's pass, once, with the tensors a plain sink gets afterwards; the aligned model is not computed a second
    time for it."""
    import symmerge.alignment as alignment_module

    config, ref, ft = _llama_fine_tune_pair(tmp_path)
    plain = []
    expected = symmerge.align(ref, ft, symmetries="auto", config=config, sink=lambda k, t: plain.append((k, t.clone())))
    assert expected.report.matching["auto"]["kept"] == "all" and alignment_module.permutes_nothing(expected.transform)
    passes = []
    real = alignment_module.stream_into
    monkeypatch.setattr(alignment_module, "stream_into", lambda *a: passes.append(1) or real(*a))
    sink = _RestartableSink()
    result = symmerge.align(ref, ft, symmetries="auto", config=config, sink=sink)
    assert passes == [] and sink.restarts == 0 and result.fed  # fed in the report's pass, no second pass
    assert [k for k, _ in sink.received] == [k for k, _ in plain] == list(result.state_dict)
    for (k, t), (_, u) in zip(sink.received, plain):
        assert torch.equal(t, u), k
    assert result.report.distance_after == expected.report.distance_after


def test_auto_restarts_a_speculatively_fed_sink_when_the_residual_map_is_kept(tmp_path, monkeypatch):
    """Should the residual map be fitted after a speculative feed (forced here: MIN_GAIN below any gain), the sink is
    restarted and then holds exactly the kept candidate's tensors, once each."""
    import symmerge.alignment as alignment_module

    config, ref, ft = _llama_fine_tune_pair(tmp_path)
    monkeypatch.setattr(alignment_module, "MIN_GAIN", -1.0)
    monkeypatch.setattr(alignment_module, "AUTO_MARGIN", -1e9)  # keep the residual candidate whatever its distance
    sink = _RestartableSink()
    result = symmerge.align(ref, ft, symmetries="auto", config=config, sink=sink)
    assert result.report.matching["auto"]["kept"] == "all,residual" and sink.restarts == 1
    assert [k for k, _ in sink.received] == list(result.state_dict)
    for k, t in sink.received:
        assert torch.equal(t, result.state_dict[k]), k


def test_an_independent_pair_is_not_fed_speculatively(tmp_path):
    """Independent models: the per-layer element permutes neurons, so the sink waits for the kept candidate (no
    speculative write to throw away)."""
    model_a, _ = make_model("llama", 0)
    model_b, _ = make_model("llama", 1)
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    ref, other = LazyState(open_checkpoint(tmp_path / "a")), LazyState(open_checkpoint(tmp_path / "b"))
    sink = _RestartableSink()
    result = symmerge.align(ref, other, symmetries="auto", config=model_a.config, sink=sink)
    assert sink.restarts == 0 and [k for k, _ in sink.received] == list(result.state_dict)


def test_shard_writer_restart_forgets_what_was_added(tmp_path):
    """After ``restart()`` the writer's files are what a fresh writer makes of the tensors added since."""
    g = torch.Generator().manual_seed(0)
    first = {f"t{i}": torch.randn(300, generator=g) for i in range(5)}
    second = {f"t{i}": torch.randn(300, generator=g) for i in range(5)}
    (tmp_path / "restarted").mkdir()
    (tmp_path / "fresh").mkdir()
    writer = ShardWriter(tmp_path / "restarted", 2500)
    for k, v in first.items():
        writer(k, v)
    writer.restart()
    for k, v in second.items():
        writer(k, v)
    writer.close()
    fresh = ShardWriter(tmp_path / "fresh", 2500)
    for k, v in second.items():
        fresh.add(k, v)
    fresh.close()
    names = sorted(p.name for p in (tmp_path / "restarted").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fresh").iterdir()) and len(names) > 2
    for n in names:
        assert (tmp_path / "restarted" / n).read_bytes() == (tmp_path / "fresh" / n).read_bytes()


def _layout(tensors):
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    return [(k, names[v.dtype], tuple(v.shape)) for k, v in tensors.items()]


@pytest.mark.parametrize("change", ["none", "shape", "name", "missing", "extra", "early"])
def test_an_announced_writer_writes_the_same_files(tmp_path, change, monkeypatch):
    """``expect()``: announced tensors go straight into their shard (no data file copied behind a header), and the
    files are byte for byte the unannounced writer's; an announcement that turns out wrong (another shape or
    name, a tensor missing at the end, one more than announced, or one that would have fit the shard just closed)
    falls back at that tensor, with the same files."""
    import symmerge.io.stream as stream_module

    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=g).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(7)}
    announced = _layout(tensors)
    if change == "shape":
        announced[3] = (announced[3][0], announced[3][1], (5, 20))
    elif change == "name":
        announced[4] = ("other", *announced[4][1:])
    elif change == "missing":
        announced.append(("layer.7.weight", "F32", (10, 10)))
    elif change == "extra":
        announced.pop()
    elif change == "early":  # announced larger: the plan closes a shard the real tensor would not have filled
        announced[2] = (announced[2][0], "F32", (20, 10))
    copies = []
    real = stream_module._copy_range
    monkeypatch.setattr(stream_module, "_copy_range", lambda *a: copies.append(a[3]) or real(*a))
    expected = _write(tmp_path / "plain", tensors, max_shard_bytes=700)
    plain_copies, copies[:] = len(copies), []
    (tmp_path / "announced").mkdir()
    writer = ShardWriter(tmp_path / "announced", 700)
    writer.expect(announced)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert [f.name for f in files] == [f.name for f in expected] and len(files) > 2
    for ours, theirs in zip(files, expected):
        assert ours.read_bytes() == theirs.read_bytes()
    assert sorted(p.name for p in (tmp_path / "announced").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert plain_copies == len(tensors)
    if change == "none":
        assert copies == []  # announced rightly: no tensor copied behind a header
    elif change != "missing":  # (the announced tensor that never came would have opened a shard of its own here)
        assert copies  # the shard begun moved to a data file: the fallback ran


def test_the_cli_writes_an_announced_fine_tune_without_copying_shards(tmp_path, monkeypatch, capsys):
    """``symmerge align`` of a fine-tune: the aligned model's layout is announced to the writer (same-width per-layer
    element), so no shard's data is copied at the end, and the files are what they were."""
    import symmerge.io.stream as stream_module

    _llama_fine_tune_pair(tmp_path)
    assert run_cli(capsys, "align", tmp_path / "a", tmp_path / "ft", "-o", tmp_path / "plain", "-q")[0] == 0
    copies = []
    real = stream_module._copy_range
    monkeypatch.setattr(stream_module, "_copy_range", lambda *a: copies.append(a[3]) or real(*a))
    assert run_cli(capsys, "align", tmp_path / "a", tmp_path / "ft", "-o", tmp_path / "announced", "-q")[0] == 0
    assert copies == [] and list((tmp_path / "announced" / "ft").glob("*.safetensors"))
    for f in (tmp_path / "plain" / "ft").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "announced" / "ft" / f.name).read_bytes()
