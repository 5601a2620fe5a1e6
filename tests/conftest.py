"""Tiny random models of every supported family, and helpers to compare what two weight sets compute."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

# CI sets this: there a missing packaged model or data set fails the test instead of skipping it silently
REQUIRE_ASSETS = os.environ.get("SYMMERGE_REQUIRE_ASSETS") == "1"


def missing_asset(reason: str):
    """Skip the calling test because a packaged asset (real weights, a data set) is missing — or fail it when
    ``SYMMERGE_REQUIRE_ASSETS=1``, so that no real-weight or zoo test skips silently in CI."""
    if REQUIRE_ASSETS:
        pytest.fail(f"required asset missing (SYMMERGE_REQUIRE_ASSETS=1): {reason}")
    pytest.skip(reason)


def require_module(name: str, reason: str = ""):
    """``import name``, or :func:`missing_asset`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_asset(reason or f"{name} is not installed")


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}


def _bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}


def _bert_classifier():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=64,
                                  max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}


def _roberta_classifier():
    cfg = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=64,
                                     max_position_embeddings=40, pad_token_id=1, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg), lambda g: {"input_ids": torch.randint(3, 64, (2, 12), generator=g)}


def _roberta():
    cfg = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=64,
                                     max_position_embeddings=40, pad_token_id=1)
    return transformers.RobertaForMaskedLM(cfg), lambda g: {"input_ids": torch.randint(3, 64, (2, 12), generator=g)}


def _vit():
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, image_size=8, patch_size=2,
                                 num_channels=1, num_labels=5)
    return transformers.ViTForImageClassification(cfg), lambda g: {"pixel_values": torch.randn(2, 1, 8, 8, generator=g)}


def _deberta_classifier():
    cfg = transformers.DebertaV2Config(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=64,
                                       max_position_embeddings=32, num_labels=3, relative_attention=True, share_att_key=True,
                                       pos_att_type=["p2c", "c2p"], position_buckets=8, norm_rel_ebd="layer_norm", type_vocab_size=2)
    return transformers.DebertaV2ForSequenceClassification(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}


def _decoder(config_cls, model_cls, kv_heads, tie=False, **extra):
    def build():
        cfg = config_cls(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         vocab_size=64, max_position_embeddings=64, tie_word_embeddings=tie, **extra)
        return model_cls(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}
    return build


def _gpt_neox(**extra):
    def build():
        cfg = transformers.GPTNeoXConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                                         max_position_embeddings=64, **extra)
        return transformers.GPTNeoXForCausalLM(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}
    return build


def _opt(**extra):
    def build():
        cfg = transformers.OPTConfig(hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                                     max_position_embeddings=64, word_embed_proj_dim=48, pad_token_id=1, bos_token_id=0, eos_token_id=0, **extra)
        return transformers.OPTForCausalLM(cfg), lambda g: {"input_ids": torch.randint(2, 64, (2, 12), generator=g)}
    return build


def _gptj(**extra):
    def build():
        cfg = transformers.GPTJConfig(n_layer=2, n_embd=48, n_head=4, n_inner=80, rotary_dim=6, vocab_size=64, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, **extra)
        return transformers.GPTJForCausalLM(cfg), lambda g: {"input_ids": torch.randint(0, 64, (2, 12), generator=g)}
    return build


FAMILIES = {
    "bert": _bert,
    "bert-cls": _bert_classifier,  # post-LN with a head: residual permutations
    "roberta": _roberta,
    "roberta-cls": _roberta_classifier,
    "vit": _vit,
    "gpt2": _gpt2,
    "llama": _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM, 2),  # GQA, RoPE, SwiGLU
    "qwen2": _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 2),  # + Q/K/V biases
    "mistral": _decoder(transformers.MistralConfig, transformers.MistralForCausalLM, 1),  # MQA
    # fused qkv_proj (q | k | v rows, GQA sizes) and gate_up_proj
    "phi3": _decoder(transformers.Phi3Config, transformers.Phi3ForCausalLM, 2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # per-head q_norm / k_norm (one gain shared by all heads): no QK map is a symmetry; head_dim ≠ hidden / heads
    "qwen3": _decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 2, head_dim=16),
    # RMSNorm gain 1 + w, embeddings scaled by √d, tied LM head
    "gemma": _decoder(transformers.GemmaConfig, transformers.GemmaForCausalLM, 2, tie=True, head_dim=16),
    # + sandwich norms, attention logit soft-capping (small cap so it bites), query_pre_attn_scalar, sliding window
    "gemma2": _decoder(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, 2, head_dim=12, attn_logit_softcapping=2.0,
                       final_logit_softcapping=3.0, query_pre_attn_scalar=20, sliding_window=6),
    # Pythia: Q|K|V fused per head, partial rotary (rotary_pct 0.25), LayerNorms with biases, untied embed_out
    "gpt_neox": _gpt_neox(use_parallel_residual=True),
    "gpt_neox-sequential": _gpt_neox(use_parallel_residual=False),
    # partial rotary (0.25 would rotate 3 of 12 dims, which transformers' StableLM cannot), LayerNorm, GQA, Q/K/V biases
    "stablelm": _decoder(transformers.StableLmConfig, transformers.StableLmForCausalLM, 2, partial_rotary_factor=0.5, use_qkv_bias=True),
    # one input_layernorm read by attention and MLP (parallel block), partial rotary, LM head with a bias
    "phi": _decoder(transformers.PhiConfig, transformers.PhiForCausalLM, 2),
    # pre-LN, learned positions (2 offset rows), ReLU fc1/fc2, Q/K/V/out biases, tied LM head
    "opt": _opt(),
    # llama names with scalar multipliers (attention, residual, embedding, logits) away from 1 so they bite
    "granite": _decoder(transformers.GraniteConfig, transformers.GraniteForCausalLM, 2, attention_multiplier=0.3, residual_multiplier=0.7,
                        embedding_multiplier=3.0, logits_scaling=2.0),
    # non-parametric LayerNorms
    "olmo": _decoder(transformers.OlmoConfig, transformers.OlmoForCausalLM, 2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # RMSNorms on what attention and FFN write (no pre-norms), q_norm / k_norm over the whole Q and K projections
    "olmo2": _decoder(transformers.Olmo2Config, transformers.Olmo2ForCausalLM, 2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # one ln_1 read by attention and MLP, partial interleaved rotary (rotary_dim 6 of 12), LM head with a bias
    "gptj": _gptj(),
    # LayerNorm without bias, one input_layernorm (parallel block), interleaved RoPE, logit_scale, tied embeddings
    "cohere": _decoder(transformers.CohereConfig, transformers.CohereForCausalLM, 2, tie=True, logit_scale=0.5, pad_token_id=0,
                       bos_token_id=0, eos_token_id=0),
    "deberta-v2-cls": _deberta_classifier,  # disentangled attention (c2p, p2c) with share_att_key; post-LN: residual permutations
}


GAIN_OFFSET_FAMILIES = ("gemma", "gemma2")


def make_model(family: str, seed: int = 0):
    """(model in eval mode, make_inputs(generator)) for a tiny random model of ``family``.

    Weights are drawn at a larger scale than HF's init (std 0.02) so that heads and neurons differ clearly and
    biases and norms are not trivially zero/one: every symmetry then visibly moves the parameters.
    """
    torch.manual_seed(seed)
    model, make_inputs = FAMILIES[family]()
    gain = 0.0 if model.config.model_type in GAIN_OFFSET_FAMILIES else 1.0  # Gemma's norms scale by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.05 if name.startswith("lm_head") else 0.2 if p.ndim > 1 else 0.1  # logits O(1), like HF's init
            p.copy_(torch.randn_like(p) * std + (gain if p.ndim == 1 and ("norm" in name.lower() or ".ln_" in name) and name.endswith("weight") else 0.0))
    return model.eval(), make_inputs


@torch.no_grad()
def outputs(model, state, inputs) -> torch.Tensor:
    """The model's first output (logits / last hidden state) with ``state`` loaded."""
    model.load_state_dict(state)
    return model(**inputs)[0]


def max_output_diff(model, state_a, state_b, make_inputs, seed: int = 0) -> float:
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    return float((outputs(model, state_a, inputs) - outputs(model, state_b, inputs)).abs().max())


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``symmerge ARGS`` in-process: (exit code, stdout, stderr), ignoring what the test printed before."""
    from symmerge.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_cli_error(capsys, message: str, *args) -> str:
    """The command fails with exit code 2 and one line ``error: ...`` containing ``message``."""
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    return err


def merge_recipe(capsys, tmp_path, text: str, *flags) -> tuple[dict, str]:
    """``symmerge merge`` of recipe ``text`` (written to ``tmp_path/r.yaml``) into ``tmp_path/out``: the merged
    tensors and stdout; the command must succeed."""
    from safetensors.torch import load_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "r.yaml").write_text(text)
    code, stdout, err = run_cli(capsys, "merge", tmp_path / "r.yaml", tmp_path / "out", "-q", "--force", *flags)
    assert code == 0, err
    return load_file(tmp_path / "out" / "model.safetensors"), stdout


def save_model(model, path, state=None):
    """``model`` saved as an HF directory at ``path`` (with ``state`` as its weights when given)."""
    from safetensors.torch import save_file

    model.save_pretrained(path)
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def save_checkpoint(path, state: dict, config: dict):
    """A bare checkpoint folder (``model.safetensors`` and ``config.json``, nothing else) at a new ``path``: models of
    architectures transformers need not build (unknown families, vision-language modules)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def stray_folders(directory) -> list[str]:
    """Temporary folders symmerge may leave beside an output: ``.NAME.partial-*``, ``.NAME.old-*``, ``.NAME.probe-*``."""
    from pathlib import Path

    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(".") and any(
        tag in p.name for tag in (".partial-", ".old-", ".probe-")))


def cli_env() -> dict:
    """Environment for running the ``symmerge`` command in a subprocess: this checkout first on the path, offline."""
    from pathlib import Path

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


# Hypothesis (tests/test_fuzz.py): deterministic everywhere, so a CI failure reproduces locally; no deadline, since
# the first example of a property pays for imports. HYPOTHESIS_PROFILE=random explores new examples instead.
try:
    from hypothesis import HealthCheck
    from hypothesis import Phase as _Phase
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _hypothesis_settings.register_profile("random", deadline=None, print_blob=True,
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _hypothesis_settings.register_profile("fast-fail", derandomize=True, deadline=None, phases=[_Phase.explicit, _Phase.generate],
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is only needed by the fuzz tests
    pass
