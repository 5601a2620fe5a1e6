"""Activation matching's sufficient statistics (``accumulate_statistics``: float32 GEMMs per batch, float64 sums over
batches, the per-layer part skipped with the residual class) against the plain computation: every position of every
batch at once, in float64, straight from the definitions in ``symmerge.match.activations``."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_model

from symmerge.groups import SYMMETRY_CLASSES
from symmerge.io.hf import build_model, hf_activations, with_fused_gelu
from symmerge.match.activations import HEAD_PARTS, _blocks_carry_the_stream, accumulate_statistics, per_layer_from_activations, record_activations
from symmerge.match.residual import solve_residual
from symmerge.spec import spec_for

PER_LAYER = frozenset(SYMMETRY_CLASSES) - {"residual"}


def plain_statistics(reference, model, batches) -> dict[str, torch.Tensor]:
    """``H_ref^T H_model`` per FFN, ``Z^T Z`` of ``Z = [ref | model]`` per head part, ``Σ_layers H_model^T H_ref``:
    all positions concatenated, float64."""
    spec = spec_for(reference.config, reference.state_dict().keys())
    runs = [[record_activations(m, spec, b, residual=True) for b in batches] for m in (reference, model)]

    def stacked(run: list[dict], key: str) -> torch.Tensor:
        return torch.cat([acts[key] for acts in run]).double()

    sums = {g.name + "/ffn": stacked(runs[0], g.name + "/hidden").T @ stacked(runs[1], g.name + "/hidden") for g in spec.ffn}
    for g in spec.attention:
        for part in HEAD_PARTS:
            z = torch.cat([stacked(runs[0], f"{g.name}/{part}"), stacked(runs[1], f"{g.name}/{part}")], dim=1)
            sums[f"{g.name}/{part}"] = z.T @ z
    layers = len(runs[0][0]["residual"])
    sums["residual"] = sum(torch.cat([a["residual"][i] for a in runs[1]]).double().T @ torch.cat([a["residual"][i] for a in runs[0]]).double()
                           for i in range(layers))
    return sums


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_statistics_equal_the_plain_float64_sums_and_give_the_same_element(family):
    reference, make_inputs = make_model(family, 0)
    model, _ = make_model(family, 1)
    batches = [make_inputs(torch.Generator().manual_seed(i)) for i in range(3)]
    plain = plain_statistics(reference, model, batches)
    fast, live = accumulate_statistics(reference, model, batches, residual=True)
    assert fast.keys() == plain.keys()
    for key, value in plain.items():
        assert fast[key].dtype == torch.float64
        torch.testing.assert_close(fast[key], value, rtol=0, atol=1e-5 * float(value.abs().max()), msg=key)
    # the element the statistics give: FFN permutations and head elements equal, the residual map to rounding
    sa, sb = reference.state_dict(), model.state_dict()
    t_fast, _ = per_layer_from_activations(fast, live, live, PER_LAYER, sa, sb)
    t_plain, _ = per_layer_from_activations(plain, live, live, PER_LAYER, sa, sb)
    for name, perm in t_plain.ffn.items():
        assert torch.equal(t_fast.ffn[name], perm), name
    for name, heads in t_plain.heads.items():
        assert torch.equal(t_fast.heads[name].perm, heads.perm), name
        for part in ("qk_rotation", "qk_scale", "vo_rotation", "vo_scale"):
            torch.testing.assert_close(getattr(t_fast.heads[name], part), getattr(heads, part), rtol=0, atol=1e-4, msg=f"{name} {part}")
    kind = spec_for(reference.config, sa.keys()).residual.kind
    torch.testing.assert_close(solve_residual(fast["residual"], kind), solve_residual(plain["residual"], kind), rtol=0, atol=1e-4)


def test_residual_alone_records_only_the_stream():
    """With the residual class the per-layer statistics are never read (the weight descent gives those elements):
    ``per_layer=False`` returns the residual sum alone, the same as the full accumulation's."""
    reference, make_inputs = make_model("gpt2", 0)
    model, _ = make_model("gpt2", 1)
    batches = [make_inputs(torch.Generator().manual_seed(i)) for i in range(2)]
    full, _ = accumulate_statistics(reference, model, batches, residual=True)
    alone, _ = accumulate_statistics(reference, model, batches, residual=True, per_layer=False)
    assert alone.keys() == {"residual"}
    assert torch.equal(alone["residual"], full["residual"])


def test_fused_gelu_computes_the_same_model():
    """Every model symmerge runs (activation and learned matching, barriers, REPAIR, statistics: ``build_model``)
    has GPT-2's ``gelu_new`` fused (:func:`symmerge.io.hf.with_fused_gelu`): no unfused module is left, and the
    outputs are those of the model as transformers builds it, to float rounding."""
    model, make_inputs = make_model("gpt2", 0)
    inputs = make_inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(**inputs)[0]
        fused = with_fused_gelu(model)
        after = fused(**inputs)[0]
    assert any(type(m) is hf_activations.GELUTanh for m in fused.modules())
    assert not any(type(m) is hf_activations.NewGELUActivation for m in fused.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * float(before.abs().max()))
    built = build_model(model.config.to_dict(), model.state_dict())
    assert not any(type(m) is hf_activations.NewGELUActivation for m in built.modules())
    assert built.config.use_cache is False  # run, never generated from: no key/value cache filled on every forward
    with torch.no_grad():
        torch.testing.assert_close(built(**inputs)[0], before, rtol=0, atol=1e-5 * float(before.abs().max()))


NO_RESIDUAL_CLASS = ("bert", "roberta")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_inputs_are_the_stream(family):
    """The residual statistics read each block's input and stop before the last block runs, once a first batch
    shows those inputs equal the model's ``hidden_states`` (all but the last): true of every family here. Negative
    control: the blocks of another model do not pass the check."""
    model, make_inputs = make_model(family, 0)
    spec = spec_for(model.config, model.state_dict().keys())
    if spec.residual is None or not spec.blocks:  # post-LN encoders without a head reading the stream: no stream statistic
        assert family in NO_RESIDUAL_CLASS
        return
    batch = make_inputs(torch.Generator().manual_seed(0))
    both = record_activations(model, spec, batch, residual=True, per_layer=False, stream="both")
    assert _blocks_carry_the_stream(both)
    stopped = record_activations(model, spec, batch, residual=True, per_layer=False, stream="blocks")
    assert len(stopped["residual"]) == len(both["residual"])
    assert all(torch.equal(a, b) for a, b in zip(stopped["residual"], both["residual"]))
    other, _ = make_model(family, 1)
    assert not _blocks_carry_the_stream({**both, "block_inputs": record_activations(other, spec, batch, True, False, "both")["block_inputs"]})
