"""The scale benchmarks' own arithmetic: layer-reduced LLaMA shapes (``benchmarks/scale.py --layers``) and the
constant + per-layer projection of ``benchmarks/residual_round.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale = _load("scale")
residual_round = _load("residual_round")


def _count(shapes) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def test_layer_reduced_7b_keeps_the_widths_and_only_drops_layers():
    full, two, four = (scale.tensor_shapes("7b", n) for n in (None, 2, 4))
    assert _count(full) == 6_738_415_616  # LLaMA-7B, untied head
    widths = dict(full)
    for reduced, n in ((two, 2), (four, 4)):
        assert all(widths[name] == shape for name, shape in reduced)  # every tensor as in the full model
        assert sum(".layers." in name for name, _ in reduced) == 9 * n
        assert {name for name, _ in reduced if ".layers." not in name} == {name for name, _ in full if ".layers." not in name}
    per_layer = (_count(four) - _count(two)) / 2
    assert _count(full) == pytest.approx(_count(two) + 30 * per_layer)  # the line the projection uses is exact for sizes
    assert scale.config_dict("7b", 2)["num_hidden_layers"] == 2 and scale.config_dict("7b")["num_hidden_layers"] == 32
    assert scale.folder("7b", 2) == "7b-L2" and scale.folder("7b") == "7b"
    with pytest.raises(SystemExit):
        scale.sizes("7b", 0)


def _row(layers: int, const: float, per: float) -> dict:
    stage = lambda v: {"wall_s": 2 * v, "cpu_s": v}  # noqa: E731
    row = {k: stage(const + layers * per) for k in residual_round.STAGES}
    row["descent_identity"]["round_seconds"] = [row["descent_identity"]["wall_s"] / 2]  # half the stage is the round
    row["total"] = {m: sum(row[k][m] for k in residual_round.STAGES) for m in ("wall_s", "cpu_s")}
    return {"layers": layers, **row}


def test_projection_recovers_a_known_line_and_counts_later_rounds():
    rows = {"L2": _row(2, 10.0, 3.0), "L4": _row(4, 10.0, 3.0)}
    out = residual_round.project(rows, 32, rounds=3)
    assert out["descent_identity.cpu_s"] == {"constant": 10.0, "per_layer": 3.0, "at_32": 106.0}
    assert out["total.wall_s"]["at_32"] == pytest.approx(3 * 2 * 106.0)
    # a later round is half the identity stage here: 3 rounds per start add 2 × 2 later rounds
    assert out["3_rounds_per_start.cpu_s"] == pytest.approx(3 * 106.0 + 4 * 53.0)
    assert out["3_rounds_per_start.wall_s"] == pytest.approx(2 * (3 * 106.0 + 4 * 53.0))
    assert residual_round.project(rows, 32, rounds=1)["1_rounds_per_start.cpu_s"] == pytest.approx(3 * 106.0)


def test_projection_needs_two_layer_counts():
    with pytest.raises(SystemExit, match="two layer counts"):
        residual_round.project({"L2": _row(2, 1.0, 1.0), "L2 again": _row(2, 1.0, 1.0)}, 32, 1)
