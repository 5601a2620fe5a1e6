"""Chat templates by name: the five formats mergekit's ``chat_template:`` accepts by name (``chatml``, ``llama3``,
``mistral``, ``alpaca``, ``exaone``), written here from each format's public definition (symmerge's own Jinja, not
mergekit's files). Each renders the same under plain ``jinja2`` and under transformers' ``apply_chat_template``
(whose environment trims blocks): every template is one line, and every newline it emits is a ``'\\n'`` inside a
Jinja string, never template whitespace. Variables: ``messages`` (``role``/``content``), ``add_generation_prompt``,
``bos_token``, ``eos_token`` (an absent token renders empty). ``benchmarks/mergekit_conformance.py`` renders them
beside mergekit's files over a set of conversations."""

from __future__ import annotations

#: ChatML (OpenAI; Qwen, Hermes...): ``<|im_start|>ROLE\nCONTENT<|im_end|>\n`` per message, any role; the generation
#: prompt opens an assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Llama 3 (Meta): ``bos_token`` (``<|begin_of_text|>``), then per message a header
#: ``<|start_header_id|>ROLE<|end_header_id|>\n\n``, the content stripped of surrounding whitespace and ``<|eot_id|>``,
#: with nothing between messages; the generation prompt is an assistant header.
LLAMA3 = (
    "{% if messages %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

#: Mistral instruct ([INST], the form of Mistral-7B-Instruct's Hugging Face template): ``bos_token``, then user turns
#: `` [INST] CONTENT [/INST]`` and assistant turns `` CONTENT`` + ``eos_token``, strictly alternating from a user
#: turn; an optional first system message is prepended to the first user turn, followed by a blank line. No
#: generation prompt (the format has none: the model answers after ``[/INST]``).
MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] ~ '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for turn in turns %}"
    "{% if (turn['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('mistral: after an optional system message, the roles must alternate user, assistant, user...') }}"
    "{% elif turn['role'] == 'user' %}{{ ' [INST] ' ~ (system if loop.first else '') ~ turn['content'] ~ ' [/INST]' }}"
    "{% elif turn['role'] == 'assistant' %}{{ ' ' ~ turn['content'] ~ eos_token }}"
    "{% else %}{{ raise_exception('mistral: only user and assistant turns, and one system message first') }}"
    "{% endif %}"
    "{% endfor %}"
)

#: Alpaca (Stanford): blocks separated by a blank line — the system message first (the last one given, stripped)
#: when there is one, then ``### Instruction:`` (user), ``### Input:`` (``user_context``) and ``### Response:``
#: (assistant) each over its stripped content; the generation prompt opens a ``### Response:`` block unless the
#: conversation ends with one. Other roles are left out.
ALPACA = (
    "{% set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% set blocks = namespace(items=[]) %}"
    "{% if systems %}{% set blocks.items = blocks.items + [systems[-1]['content'] | trim] %}{% endif %}"
    "{% for message in messages if message['role'] in headers %}"
    "{% set blocks.items = blocks.items + [headers[message['role']] ~ '\\n' ~ (message['content'] | trim)] %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' %}"
    "{% set blocks.items = blocks.items + ['### Response:\\n'] %}"
    "{% endif %}"
    "{{ blocks.items | join('\\n\\n') }}"
)

#: EXAONE (LG AI Research, 3.0 / 3.5): ``[|ROLE|]CONTENT``, then ``\n`` after a user turn and ``[|endofturn|]\n``
#: after any other; a conversation that does not open with a system turn gets an empty one
#: (``[|system|][|endofturn|]\n``); the generation prompt is ``[|assistant|]``.
EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' ~ message['role'] ~ '|]' ~ message['content'] ~ ('\\n' if message['role'] == 'user' else '[|endofturn|]\\n') }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

#: ``chat_template: NAME`` in a recipe → the Jinja template written into the output tokenizer (as mergekit does).
CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA, "exaone": EXAONE}
