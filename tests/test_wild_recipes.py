"""Real mergekit recipes, as published (tests/data/wild_recipes, each citing its source), run through ``symmerge merge``.

Only the model names are rewritten — to tiny local checkpoints of as many layers as the recipe's layer ranges need
(the base model, or the first model when there is none, is the "pretrained" checkpoint; every other name a noisy
fine-tune of it; ``model+lora`` names a fine-tune plus a LoRA adapter) — every other key and value stays exactly as
published. Each merge must succeed and write a model transformers loads, with the layer count the recipe implies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import expect_cli_error, run_cli, save_model
from safetensors.torch import load_file, save_file

WILD = Path(__file__).parent / "data" / "wild_recipes"
RECIPES = sorted(p.name for p in WILD.glob("*.yml"))
# published recipes refused in one line (what the line must say): mergekit-yaml refuses a multi-document file too;
# it ignores a filtered entry's unknown key, so an early example's `pattern:` made its self_attn entry apply to every
# tensor — symmerge refuses unknown keys, as for any other typo, and says what to write
REFUSED = {"37_mega_multi_document.yml": "several YAML documents: a mergekit-mega file?",
           "02_gradient_slerp_pattern_key.yml": "unknown key 'pattern' in a filtered value (keys: filter, value): write filter",
           # a model card's stage that lost its `models:` line: invalid YAML for mergekit too
           "47_nuslerp_models_key_missing.yml":
               "mapping values are not allowed here (a list item under a key that already has a value: is a `models:` line missing above it?)",
           # mergekit ignores the misspelt `dype` (and so computes in the checkpoints' dtype); a misspelt key is refused
           # here as merge_methd is, naming the key meant (symmerge computes in float32 whatever dtype says)
           "49_sce_top_level_select_topk_dype_typo.yml": "dype: Extra inputs are not permitted, got 'float32' (did you mean dtype?)",
           "59_nearswap_dtype_stray_backtick.yml": "dtype: Input should be 'float32', 'bfloat16' or 'float16', got 'bfloat16`'",
           "52_mergekit_moe_config_yaml_anchors.yml": "a mergekit-moe config (experts:, gate_mode:) builds a mixture of experts, which mergekit-yaml refuses too",
           "56_task_arithmetic_parameters_as_list.yml":
               "parameters: a mapping of names to values (parameters: {weight: 1.0}), not a list (- weight: 1.0), as mergekit requires"}
# recipes whose tiny models have 32 or 40 layers: a few seconds each on 2 cores, run with -m slow
SLOW = {"39_task_arithmetic_lorablated_slice.yml", "03_passthrough_orcamini_platy_44layer.yml", "28_della_linear_modules_default_slices.yml"}
VOCAB = ["<unk>"] + [f"w{i}" for i in range(39)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _names(doc: dict) -> list[str]:
    """Every model reference of a mergekit recipe, in order (base model first), without repeats."""
    names: list[str] = []

    def add(name):
        if isinstance(name, str) and name not in ("union", "base") and name not in names:
            names.append(name)

    add(doc.get("base_model"))
    blocks = [doc] + [m for m in (doc.get("modules") or {}).values() if isinstance(m, dict)]
    for block in blocks:
        for entry in block.get("models") or []:
            add(entry["model"])
        for piece in block.get("slices") or []:
            add(piece.get("base_model"))
            for source in piece["sources"]:
                add(source["model"])
    source = doc.get("tokenizer_source")
    # mergekit's early `model:NAME` spelling: the prefix stays in the text, the model behind it is localized
    add(source.removeprefix("model:") if isinstance(source, str) else source)
    tokenizer = doc.get("tokenizer") if isinstance(doc.get("tokenizer"), dict) else {}
    add(tokenizer.get("source"))
    return names


def _layers_needed(doc: dict) -> int:
    ends = [s["layer_range"][1] for block in [doc] + list((doc.get("modules") or {}).values())
            for piece in block.get("slices") or [] for s in piece["sources"]]
    return max(ends, default=4)


def _expected_layers(doc: dict, layers: int) -> int:
    block = (doc.get("modules") or {}).get("default", doc)
    if not block.get("slices"):
        return layers
    return sum(piece["sources"][0]["layer_range"][1] - piece["sources"][0]["layer_range"][0] for piece in block["slices"])


def _family(doc: dict) -> str:
    """gpt2 for mergekit's gpt2 example, Mistral where the recipe names Mistral models (Mistral-Nemo: MN-), else LLaMA."""
    names = " ".join(_names(doc)).lower()
    return "gpt2" if names == "gpt2" else "mistral" if "mistral" in names or "mn-" in names else "llama"


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="w0", eos_token="w1")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _model(family: str, layers: int):
    width = 32 if layers <= 8 else 16
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=len(VOCAB), n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    config_cls, model_cls = ((transformers.MistralConfig, transformers.MistralForCausalLM) if family == "mistral"
                             else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = config_cls(hidden_size=width, intermediate_size=width * 3 // 2, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=32, tie_word_embeddings=False)
    return model_cls(cfg)


class Checkpoints:
    """Tiny checkpoints made on first use: per (family, layers) a base, fine-tunes ``ft1``, ``ft2``, ... (base + 1%
    noise) and LoRA adapters of q_proj/v_proj; every folder with the same tokenizer (and a chat template)."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def _base(self, family: str, layers: int):
        key = (family, layers)
        if key not in self.made:
            model = _model(family, layers)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.made[key] = (model, state)
            path = self.root / f"{family}{layers}" / "base"
            save_model(model, path, state)
            _tokenizer().save_pretrained(path)
        return self.made[key]

    def model(self, family: str, layers: int, index: int) -> Path:
        model, base = self._base(family, layers)
        path = self.root / f"{family}{layers}" / ("base" if index == 0 else f"ft{index}")
        if not path.exists():
            g = torch.Generator().manual_seed(100 + index)
            state = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
            save_model(model, path, state)
            _tokenizer().save_pretrained(path)
        return path

    def adapter(self, family: str, layers: int, index: int) -> Path:
        model, _ = self._base(family, layers)
        path = self.root / f"{family}{layers}" / f"lora{index}"
        if not path.exists():
            path.mkdir(parents=True)
            cfg = model.config
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            (path / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
            g = torch.Generator().manual_seed(200 + index)
            tensors = {}
            for i in range(cfg.num_hidden_layers):
                for proj, rows in (("q_proj", cfg.hidden_size), ("v_proj", cfg.num_key_value_heads * head_dim)):
                    prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}."
                    tensors[prefix + "lora_A.weight"] = 0.01 * torch.randn(2, cfg.hidden_size, generator=g)
                    tensors[prefix + "lora_B.weight"] = 0.01 * torch.randn(rows, 2, generator=g)
            save_file(tensors, path / "adapter_model.safetensors")
        return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("wild"))


def localize(text: str, checkpoints: Checkpoints) -> tuple[str, dict]:
    """The recipe ``text`` with every model name replaced by a local checkpoint (nothing else changed), and facts
    about it: the family, the layers of its models and the layer count the output must have."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError:  # a recipe published with broken YAML: nothing to localize, the CLI refuses it first
        return text, {}
    names = [n for doc in docs for n in _names(doc)]
    names = list(dict.fromkeys(names))
    family = _family(docs[0])
    layers = max(_layers_needed(doc) for doc in docs)
    mapping, plain, adapters = {}, [], []
    for name in names:
        parts = name.split("+")
        for part in parts[:1]:
            if part not in plain:
                plain.append(part)
        for part in parts[1:]:
            if part not in adapters:
                adapters.append(part)
    for i, part in enumerate(plain):
        mapping[part] = str(checkpoints.model(family, layers, i))
    for i, part in enumerate(adapters):
        mapping[part] = str(checkpoints.adapter(family, layers, i))
    for name in names:  # "model+lora": both halves local
        if "+" in name:
            mapping[name] = "+".join(mapping[p] for p in name.split("+"))
    pattern = re.compile("|".join(re.escape(n) for n in sorted(mapping, key=len, reverse=True)))
    local = pattern.sub(lambda m: mapping[m.group(0)], text) if mapping else text
    return local, {"family": family, "layers": layers, "expected_layers": _expected_layers(docs[0], layers)}


def run_wild(capsys, checkpoints: Checkpoints, name: str, tmp_path: Path) -> tuple[int, str, str, dict]:
    text, facts = localize((WILD / name).read_text(), checkpoints)
    recipe = tmp_path / name
    recipe.write_text(text)
    code, out, err = run_cli(capsys, "merge", recipe, tmp_path / "out", "-q")
    return code, out, err, facts


def _cases():
    for name in RECIPES:
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name.removesuffix(".yml"))


def test_every_recipe_cites_its_source():
    assert len(RECIPES) >= 25
    for name in RECIPES:
        assert (WILD / name).read_text().startswith("# source: "), name


@pytest.mark.parametrize("name", _cases())
def test_published_recipe_merges(name, checkpoints, tmp_path, capsys):
    if name in REFUSED:
        text, _ = localize((WILD / name).read_text(), checkpoints)
        (tmp_path / "r.yaml").write_text(text)
        expect_cli_error(capsys, REFUSED[name], "merge", tmp_path / "r.yaml", tmp_path / "out")
        return
    code, out, err, facts = run_wild(capsys, checkpoints, name, tmp_path)
    assert code == 0, err
    merged = tmp_path / "out"
    config = transformers.AutoConfig.from_pretrained(merged)
    layers = config.n_layer if facts["family"] == "gpt2" else config.num_hidden_layers
    assert layers == facts["expected_layers"]
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)  # loads: every tensor present, every shape right
    reference = _model(facts["family"], facts["layers"]).state_dict()
    state = {**load_file(merged / "model.safetensors")}
    layer_key = "transformer.h.0." if facts["family"] == "gpt2" else "model.layers.0."
    for key, value in state.items():
        generic = re.sub(r"\.(h|layers)\.\d+\.", lambda m: f".{m.group(1)}.0.", key)
        if generic in reference:
            assert value.shape == reference[generic].shape, key
    assert any(k.startswith(layer_key) for k in state)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_block_expansion_copies_layers_and_zeroes_the_new_blocks_outputs(checkpoints, tmp_path, capsys):
    """The LLaMA-Pro block expansion frankenmerge: after every 4 layers a copy of the 4th with o_proj and down_proj
    scaled by 0 (a source's ``scale`` filtered by tensor name), so each new block starts as the identity."""
    name = "38_passthrough_block_expansion_scale.yml"
    code, _, err, facts = run_wild(capsys, checkpoints, name, tmp_path)
    assert code == 0, err
    out = load_file(tmp_path / "out" / "model.safetensors")
    source = {k: v.to(torch.bfloat16) for k, v in load_file(checkpoints.model(facts["family"], facts["layers"], 0) / "model.safetensors").items()}
    assert all(v.dtype == torch.bfloat16 for v in out.values())  # the recipe's dtype, rounded once
    for block in range(8):
        for i in range(4):  # output layer 5·block + i is source layer 4·block + i
            key = "model.layers.{}.mlp.down_proj.weight"
            assert torch.equal(out[key.format(5 * block + i)], source[key.format(4 * block + i)])
        copy, of = 5 * block + 4, 4 * block + 3
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            assert not out[f"model.layers.{copy}.{proj}.weight"].any()
        for proj in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm"):
            assert torch.equal(out[f"model.layers.{copy}.{proj}.weight"], source[f"model.layers.{of}.{proj}.weight"])
