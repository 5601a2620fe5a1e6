"""Merging vocabularies as mergekit does: ``tokenizer_source: union|base|MODEL`` and the ``tokenizer:`` block
(``tokens``, ``pad_to_multiple_of``), on tiny LLaMA checkpoints with tiny WordLevel tokenizers built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import expect_cli_error, run_cli, save_model
from safetensors.torch import load_file
from tokenizers import AddedToken

from symmerge.io.tokenizer import Vocabulary
from symmerge.merge.vocabulary import fill_missing_rows, token_permutation, union_tokens

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# base and A share most tokens at different ids; B brings three tokens of its own and a special token <sep>
VOCABS = {"base": ["<unk>", "a", "b", "c", "d"], "a": ["<unk>", "a", "b", "e", "c"], "b": ["<unk>", "d", "f", "a", "g"]}
SPECIAL = {"b": "<sep>"}
UNION = ["<unk>", "a", "b", "c", "d", "e", "f", "g", "<sep>"]  # base's, then A's new ones, then B's, then added


def _tokenizer(tokens: list[str], special: str | None) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    if special:
        tok.add_special_tokens({"additional_special_tokens": [special]})
    return tok


def _llama(vocab_size: int, seed: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny LLaMAs, each with its own WordLevel tokenizer (VOCABS) and as many embedding rows as tokens."""
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for seed, (name, tokens) in enumerate(VOCABS.items()):
        tok = _tokenizer(tokens, SPECIAL.get(name))
        model = _llama(len(tok), seed)
        save_model(model, root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _merge(capsys, tmp_path: Path, text: str) -> tuple[dict, Path, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "merge", recipe, out, "-q")
    assert code == 0, err
    return load_file(out / "model.safetensors"), out, stdout + err


def _rows(models: dict[str, Path]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """model → tensor → token → its row in that model."""
    out = {}
    for name, path in models.items():
        state = load_file(path / "model.safetensors")
        tokens = VOCABS[name] + ([SPECIAL[name]] if name in SPECIAL else [])
        out[name] = {k: {t: state[k][i] for i, t in enumerate(tokens)} for k in (EMBED, HEAD)}
    return out


def test_union_order_is_base_then_each_model_in_id_order_then_added_tokens():
    base = Vocabulary({"x": 0, "y": 1}, {}, 2)
    a = Vocabulary({"z": 0, "x": 1, "w": 2, "<s>": 3}, {3: AddedToken("<s>", special=True)}, 4)
    b = Vocabulary({"v": 1, "q": 0, "late": 2}, {}, 2)  # "late" has no embedding row (id >= vocab_size): skipped
    plain, added = union_tokens([base, a, b])
    assert plain == ["z", "w", "q", "v"]
    assert [t.content for t in added] == ["<s>"]


def test_fill_rule_donor_base_average_zero_and_overrides():
    vocab_out = {t: i for i, t in enumerate(["s", "b", "ab", "a", "none"])}
    who = [0, 1, 2]  # model 0, model 1, base (2)
    vocabs = [Vocabulary({"s": 0, "ab": 1, "a": 2}, {}, 3), Vocabulary({"s": 0, "ab": 1, "b": 2}, {}, 3),
              Vocabulary({"s": 0, "b": 1}, {}, 2)]
    perms = [token_permutation(vocab_out, v) for v in vocabs]
    rows = [torch.zeros(5, 2) for _ in who]
    for r, p, shift in zip(rows, perms, (1.0, 10.0, 100.0)):
        r[p >= 0] = torch.arange(float((p >= 0).sum())).unsqueeze(1).repeat(1, 2) + shift
    a0, a1 = rows[0][2].clone(), rows[1][2].clone()
    filled = fill_missing_rows(rows, [p >= 0 for p in perms], who, 2, {}, 5)
    assert torch.equal(filled[0][1], rows[2][1])  # "b": models 1 and base have it -> the base's row
    assert torch.equal(filled[2][2], (a0 + a1) / 2)  # "ab": the two models, not the base -> their mean
    assert all(torch.equal(f[3], rows[0][3]) for f in filled)  # "a": model 0 alone -> its row (donor)
    assert all(torch.equal(f[4], torch.zeros(2)) for f in filled)  # nobody has it
    assert all(torch.equal(f[0], r[0]) for f, r in zip(filled, rows))  # everyone has "s": untouched
    from symmerge.merge.vocabulary import TokenSource

    forced = fill_missing_rows(rows, [p >= 0 for p in perms], who, 2, {0: TokenSource(0, 1, 2, force=True)}, 5)
    assert all(torch.equal(f[0], rows[1][2]) for f in forced)  # force: every model takes model 1's row of "b"


def test_union_linear_merge_maps_every_row_to_its_token(capsys, tmp_path, models):
    state, out, _ = _merge(capsys, tmp_path, f"""
models: [{{model: {models['base']}}}, {{model: {models['a']}}}, {{model: {models['b']}}}]
merge_method: linear
tokenizer_source: union
alignment: none
dtype: float32
""")
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    vocab = tok.get_vocab()
    assert sorted(vocab, key=vocab.get) == UNION
    assert tok("a e g").input_ids == [UNION.index("a"), UNION.index("e"), UNION.index("g")]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(UNION)
    rows = _rows(models)
    for key in (EMBED, HEAD):
        merged = state[key]
        assert merged.shape[0] == len(UNION)
        for u, token in enumerate(UNION):
            have = [rows[m][key][token] for m in ("base", "a", "b") if token in rows[m][key]]
            # a model lacking a token holds the mean of the others' rows (one donor: its row), so the linear merge of
            # the three equals the mean of the rows that exist
            expected = torch.stack(have).mean(0)
            assert torch.allclose(merged[u], expected, atol=1e-6), (key, token)
        # negative control: merging rows by id (as without a tokenizer source) gives another row for "a"
        by_id = (rows["base"][key]["a"] + rows["a"][key]["a"] + rows["b"][key]["<unk>"]) / 3
        assert not torch.allclose(merged[UNION.index("a")], by_id, atol=1e-3)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([tok("a e g <sep>").input_ids])).logits.shape[-1] == len(UNION)


def test_union_with_a_base_fills_from_the_base(capsys, tmp_path, models):
    state, _, _ = _merge(capsys, tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {models['b']}}}]
base_model: {models['base']}
merge_method: task_arithmetic
parameters: {{weight: 1.0}}
tokenizer_source: union
alignment: none
allow_unrelated_base: true
dtype: float32
""")
    rows = _rows(models)
    for key in (EMBED, HEAD):
        for u, token in enumerate(UNION):
            present = {m: rows[m][key][token] for m in ("base", "a", "b") if token in rows[m][key]}
            if len(present) == 1:
                fill = next(iter(present.values()))  # the donor
            elif "base" in present:
                fill = present["base"]
            else:
                fill = torch.stack(list(present.values())).mean(0)
            base_row = present.get("base", fill)
            a_row, b_row = present.get("a", fill), present.get("b", fill)
            expected = base_row + (a_row - base_row) + (b_row - base_row)
            assert torch.allclose(state[key][u], expected, atol=1e-5), (key, token)


def test_tokens_block_overrides_forces_pads_and_adds(capsys, tmp_path, models):
    state, out, _ = _merge(capsys, tmp_path, f"""
models: [{{model: {models['base']}}}, {{model: {models['a']}}}, {{model: {models['b']}}}]
merge_method: linear
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    e: {{source: {{kind: zero}}}}
    a: {{source: {models['b']}, force: true}}
    h: {{source: {{kind: model_token, model: {models['a']}, token: b}}}}
alignment: none
dtype: float32
""")
    rows = _rows(models)
    vocab = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True).get_vocab()
    assert sorted(vocab, key=vocab.get) == [*UNION, "h"]  # tokens: adds what the vocabulary lacks, at the end
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    for key in (EMBED, HEAD):
        merged = state[key]
        assert merged.shape[0] == 16
        # zero, not forced: only the models lacking "e" (base, B) take zeros, A keeps its row
        assert torch.allclose(merged[UNION.index("e")], rows["a"][key]["e"] / 3, atol=1e-6)
        assert torch.allclose(merged[UNION.index("a")], rows["b"][key]["a"], atol=1e-6)  # forced for all three
        assert torch.allclose(merged[len(UNION)], rows["a"][key]["b"], atol=1e-6)
        assert torch.allclose(merged[10:], merged[:10].mean(0).expand(6, -1), atol=1e-5)  # padding: the mean row


def test_tokenizer_source_base_remaps_to_the_base_vocabulary(capsys, tmp_path, models):
    state, out, _ = _merge(capsys, tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {models['b']}}}]
base_model: {models['base']}
merge_method: linear
tokenizer_source: base
alignment: none
dtype: float32
""")
    assert (out / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()  # copied as is
    rows = _rows(models)
    assert state[EMBED].shape[0] == len(VOCABS["base"])
    # "c": A (id 4) and the base have it, B does not: B's row is the base's; linear merges the listed models A and B
    c = VOCABS["base"].index("c")
    assert torch.allclose(state[EMBED][c], (rows["a"][EMBED]["c"] + rows["base"][EMBED]["c"]) / 2, atol=1e-6)


def test_same_vocabulary_changes_no_bit(capsys, tmp_path, models):
    twin = shutil.copytree(models["a"], tmp_path / "a2")  # a model listed twice is refused: a copy of it
    text = f"models: [{{model: {models['a']}}}, {{model: {twin}}}]\nmerge_method: linear\nalignment: none\n"
    plain, _, _ = _merge(capsys, tmp_path / "plain", text)
    with_source, _, _ = _merge(capsys, tmp_path / "union", text + "tokenizer_source: union\n")
    assert plain.keys() == with_source.keys() and all(torch.equal(plain[k], with_source[k]) for k in plain)


def test_union_with_alignment_runs_and_loads(capsys, tmp_path, models):
    _, out, _ = _merge(capsys, tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {models['b']}}}]
merge_method: linear
tokenizer_source: union
alignment: {{symmetries: [all, residual]}}
""")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == 9  # A's <unk> a b e c, then B's d f g and <sep>


def test_refusals_name_the_key(capsys, tmp_path, models):
    (tmp_path / "modules.yaml").write_text(f"modules: {{text: {{models: [{{model: {models['a']}}}]}}}}\nmerge_method: linear\n")
    expect_cli_error(capsys, "modules: text: LlamaForCausalLM has one module, default", "merge", tmp_path / "modules.yaml", tmp_path / "o1")
    (tmp_path / "none.yaml").write_text(f"models: [{{model: {models['a']}}}, {{model: {models['b']}}}]\nmerge_method: linear\n"
                                        f"tokenizer: {{tokens: {{zz: {{force: true}}}}}}\n")
    expect_cli_error(capsys, "tokenizer.tokens.zz: give a source", "merge", tmp_path / "none.yaml", tmp_path / "o2")


def test_union_frankenmerge_takes_rows_from_the_slice_models(capsys, tmp_path, models):
    state, out, _ = _merge(capsys, tmp_path, f"""
slices:
  - sources: [{{model: {models['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {models['b']}, layer_range: [1, 2]}}]
merge_method: passthrough
tokenizer_source: union
""")
    rows = _rows(models)
    union = ["<unk>", "a", "b", "e", "c", "d", "f", "g", "<sep>"]  # A's (the first model), then B's, then <sep>
    for u, token in enumerate(union):
        # the embedding comes from A alone and the head from B alone: a token that model lacks is zero (mergekit: no
        # model among the tensor's inputs has it)
        for key, m in ((EMBED, "a"), (HEAD, "b")):
            expected = rows[m][key].get(token, torch.zeros(16))
            assert torch.equal(state[key][u], expected), (key, token)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_union_of_tied_models_stays_tied(capsys, tmp_path):
    paths = []
    for seed, (name, tokens) in enumerate((("x", ["<unk>", "p", "q"]), ("y", ["<unk>", "q", "r", "s"]))):
        tok = _tokenizer(tokens, None)
        model = _llama(len(tokens), seed)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        save_model(model, tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    state, out, _ = _merge(capsys, tmp_path, f"models: [{{model: {paths[0]}}}, {{model: {paths[1]}}}]\nmerge_method: linear\n"
                                             "tokenizer_source: union\nalignment: none\n")
    assert HEAD not in state and state[EMBED].shape[0] == 5  # <unk> p q r s
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    y = load_file(paths[1] / "model.safetensors")[EMBED]
    assert torch.equal(state[EMBED][4], y[3])  # "s": only y has it


def test_differing_vocabularies_with_data_driven_steps_are_refused(capsys, tmp_path, models):
    (tmp_path / "calib.txt").write_text("a b c\nd e f\n")
    (tmp_path / "r.yaml").write_text(f"models: [{{model: {models['a']}}}, {{model: {models['b']}}}]\nmerge_method: fisher\n"
                                     "tokenizer_source: union\nalignment: none\ndata: {path: calib.txt}\n")
    expect_cli_error(capsys, "tokenized by their own tokenizers", "merge", tmp_path / "r.yaml", tmp_path / "o")



# ------------------------------------------------------------------------------------------------ chat_template

TEMPLATE_X = "{% for m in messages %}X:{{ m['content'] }}\n{% endfor %}"
TEMPLATE_Y = "{% for m in messages %}Y:{{ m['content'] }}\n{% endfor %}"


def _with_template(src: Path, dest: Path, template: str | None, as_file: bool = False) -> Path:
    """A copy of checkpoint ``src`` whose tokenizer carries ``template`` (in tokenizer_config.json, or as the
    chat_template.jinja file newer transformers write)."""
    import shutil

    shutil.copytree(src, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None and not as_file:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and as_file:
        (dest / "chat_template.jinja").write_text(template + "\n")
    return dest


def _rendered(out: Path) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(out)
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_chat_template_given_and_auto_as_mergekit(capsys, tmp_path, models):
    x1 = _with_template(models["a"], tmp_path / "x1", TEMPLATE_X)
    x2 = _with_template(models["a"], tmp_path / "x2", TEMPLATE_X, as_file=True)  # the same template, stored the other way
    y = _with_template(models["a"], tmp_path / "y", TEMPLATE_Y)
    plain = _with_template(models["a"], tmp_path / "plain", None)

    def merge(name: str, first: Path, others: list[Path], template: str) -> tuple[str, str]:
        listed = ", ".join(f"{{model: {p}}}" for p in [first, *others])
        _, out, log = _merge(capsys, tmp_path / name, f"models: [{listed}]\nmerge_method: linear\nalignment: none\n"
                                                      f"chat_template: {json.dumps(template)}\n")
        return _rendered(out), log

    # auto: the plurality of the models' templates (mergekit's rule), not the copied tokenizer's (the first model's)
    rendered, log = merge("auto", y, [x1, x2], "auto")
    assert rendered == "X:hi\n" and "chat_template: auto chose the models' most common template" in log
    rendered, _ = merge("auto-one", plain, [y], "auto")  # one model has a template: it wins over none
    assert rendered == "Y:hi\n"
    rendered, _ = merge("tie", y, [x1], "auto")  # a tie: the first in recipe order
    assert rendered == "Y:hi\n"
    # a given template replaces the copied one, and a chat_template.jinja of the copied tokenizer cannot shadow it
    rendered, _ = merge("given", x2, [y], TEMPLATE_Y)
    assert rendered == "Y:hi\n"
    # negative control: without the key, the copied tokenizer's template stays
    _, out, _ = _merge(capsys, tmp_path / "none", f"models: [{{model: {y}}}, {{model: {x1}}}]\nmerge_method: linear\nalignment: none\n")
    assert _rendered(out) == "Y:hi\n"

