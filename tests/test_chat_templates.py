"""mergekit's chat template names (``chat_template: chatml|llama3|mistral|alpaca|exaone``): symmerge's own templates
render each format as its definition writes it, the same under plain jinja2 and under transformers' renderer (which
trims blocks); a merge writes the named template into the output tokenizer."""

from __future__ import annotations

import json

import jinja2
import pytest
import transformers
from conftest import expect_cli_error, merge_recipe, save_model
from transformers.utils.chat_template_utils import render_jinja_template

from symmerge.io.chat_templates import CHAT_TEMPLATES

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello "}]  # no system, padded content

# written out by hand from each format's definition (docstrings of symmerge/io/chat_templates.py)
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello <|im_end|>\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"),
    "mistral": ("<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] 2+2? [/INST]",
                "<s> [INST] Hi [/INST]  Hello </s>"),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n",
               "### Instruction:\nHi\n\n### Response:\nHello"),
    "exaone": ("[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]2+2?\n[|assistant|]",
               "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|] Hello [|endofturn|]\n"),
}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def _raise(message: str):
    raise ValueError(message)


def _renders(name: str, messages: list[dict], generation: bool) -> tuple[str, str]:
    """The template rendered by transformers (as apply_chat_template renders it) and by plain jinja2."""
    template = CHAT_TEMPLATES[name]
    hf = render_jinja_template([messages], chat_template=template, add_generation_prompt=generation, **TOKENS)[0][0]
    plain = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=generation,
                                                              raise_exception=_raise, **TOKENS)
    return hf, plain


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_renders_its_format(name):
    assert set(CHAT_TEMPLATES) == set(EXPECTED)
    long, short = EXPECTED[name]
    assert _renders(name, CHAT, True) == (long, long)
    assert _renders(name, SHORT, False) == (short, short)


def test_mistral_refuses_turns_that_do_not_alternate():
    with pytest.raises(ValueError, match="alternate"):  # plain jinja2, with our raise_exception
        jinja2.Environment().from_string(CHAT_TEMPLATES["mistral"]).render(
            messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], raise_exception=_raise, **TOKENS)
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render_jinja_template([[{"role": "assistant", "content": "a"}]], chat_template=CHAT_TEMPLATES["mistral"], **TOKENS)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A tiny LLaMA with a WordLevel tokenizer that carries no chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder = tmp_path_factory.mktemp("chat") / "m"
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=8, max_position_embeddings=16)
    save_model(transformers.LlamaForCausalLM(cfg), folder)
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(8)}, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)
    return folder


def test_a_name_is_written_into_the_output_tokenizer(capsys, tmp_path, with_tokenizer):
    _, _ = merge_recipe(capsys, tmp_path, f"models: [{{model: {with_tokenizer}}}]\nmerge_method: linear\nchat_template: llama3\n")
    out = tmp_path / "out"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATES["llama3"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, **TOKENS) == EXPECTED["llama3"][0]
    assert "chat_template" not in json.loads((with_tokenizer / "tokenizer_config.json").read_text())  # it came from the name


def test_an_unknown_name_is_one_line_listing_the_names(capsys, tmp_path, with_tokenizer):
    (tmp_path / "r.yaml").write_text(f"models: [{{model: {with_tokenizer}}}]\nmerge_method: linear\nchat_template: vicuna\n")
    expect_cli_error(capsys, "chat_template: vicuna is neither a Jinja template nor a template name "
                             "(chatml, llama3, mistral, alpaca, exaone) nor auto", "merge", tmp_path / "r.yaml", tmp_path / "o")
