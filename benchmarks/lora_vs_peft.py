"""LoRA adapters applied by symmerge vs PEFT's own ``merge_and_unload``, on adapters PEFT itself wrote.

PEFT (with transformers) lives in mergekit's venv (``.cache/bench-mergekit-venv``, see ``merge_speed.ensure_mergekit``);
a child process there builds tiny random models, wraps them with ``peft.get_peft_model``, fills every LoRA and
``modules_to_save`` tensor with random values, saves the adapter (PEFT's file format, key names and
``adapter_config.json`` as PEFT writes them) and its ``merge_and_unload`` result. symmerge then reads
``base+adapter`` (``merge_method: linear`` of one model, ``alignment: none``) and every tensor is compared.

Cases: LLaMA with ``modules_to_save: [lm_head]`` and an embedding LoRA; LLaMA with rsLoRA on q/v; GPT-2 (Conv1D,
stored in×out: attn ``c_attn`` 48×144, the square ``c_proj`` and mlp ``c_proj``) with ``lora_bias``; LLaMA with
``rank_pattern`` and ``alpha_pattern`` (per-module rank and alpha, without and with rsLoRA).
Writes benchmarks/results/lora_vs_peft.md.

    .venv/bin/python benchmarks/lora_vs_peft.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import CACHE, MK_VENV, RESULTS, child_env, ensure_mergekit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = CACHE / "lora-vs-peft"

PEFT_SIDE = textwrap.dedent('''
    import sys, torch, transformers, peft
    from pathlib import Path
    root = Path(sys.argv[1])
    def llama():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, tie_word_embeddings=False))
    def gpt2():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=64, n_positions=32))
    # per-module rank and alpha: a dotted tail, a bare name, a regular expression; the first matching key wins
    # (layer 1's q_proj takes alpha 2, not 16); "proj" names no module
    PATTERNS = ({"proj": 9, "layers.0.self_attn.q_proj": 4, "v_proj": 3},
                {r"model\\.layers\\.1\\.self_attn\\.q_proj": 2, "q_proj": 16, "embed_tokens": 5})
    cases = {
        "llama, modules_to_save lm_head + embedding LoRA + q_proj": (llama, dict(r=2, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                                                 modules_to_save=["lm_head"])),
        "llama, rsLoRA on q_proj and v_proj": (llama, dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True)),
        "gpt2 (Conv1D), c_attn + c_proj with lora_bias": (gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_bias=True)),
        "llama, rank_pattern + alpha_pattern on q/v/embedding": (llama, dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                                             rank_pattern=PATTERNS[0], alpha_pattern=PATTERNS[1])),
        "llama, rank_pattern + alpha_pattern with rsLoRA": (llama, dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                                        rank_pattern=PATTERNS[0], alpha_pattern=PATTERNS[1], use_rslora=True)),
    }
    for i, (name, (make, kw)) in enumerate(cases.items()):
        torch.manual_seed(i)
        base = make()
        base.save_pretrained(root / str(i) / "base")
        model = peft.get_peft_model(base, peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(root / str(i) / "adapter")
        model.merge_and_unload().save_pretrained(root / str(i) / "merged")
        (root / str(i) / "name").write_text(name)
    print("peft", peft.__version__, "transformers", transformers.__version__)
''')


def main() -> None:
    ensure_mergekit()
    WORK.mkdir(parents=True, exist_ok=True)
    script = WORK / "peft_side.py"
    script.write_text(PEFT_SIDE)
    env = child_env()
    env.pop("PYTHONPATH", None)  # the PEFT side runs in mergekit's venv, without symmerge
    versions = subprocess.run([str(MK_VENV / "bin" / "python"), str(script), str(WORK)], capture_output=True, text=True, env=env, check=True)
    rows = []
    for case in sorted(p for p in WORK.iterdir() if p.is_dir()):
        recipe = case / "recipe.yaml"
        recipe.write_text(f"models: [{{model: {case / 'base'}+{case / 'adapter'}}}]\nmerge_method: linear\nalignment: none\n")
        subprocess.run([sys.executable, "-m", "symmerge.cli", "merge", str(recipe), str(case / "symmerge"), "--force", "-q"],
                       check=True, capture_output=True, env=child_env())
        ours, peft_, base = (load_file(case / d / "model.safetensors") for d in ("symmerge", "merged", "base"))
        common = sorted(set(ours) & set(peft_))
        worst = max(float((ours[k].double() - peft_[k].double()).abs().max()) for k in common)
        changed = sum(not bool((base[k] == peft_[k]).all()) for k in common)
        rows.append(((case / "name").read_text(), changed, len(common), worst, sorted(set(ours) ^ set(peft_))))
        print(rows[-1], flush=True)
    lines = ["# symmerge's LoRA application vs PEFT's merge_and_unload", "",
             f"{versions.stdout.strip()} (mergekit's venv); adapters written by PEFT itself with random LoRA and modules_to_save "
             "tensors, float32. Generated by `benchmarks/lora_vs_peft.py`.", "",
             "| case | tensors PEFT changed / all | max abs diff | keys only in one |", "|---|---|---|---|"]
    lines += [f"| {name} | {changed} / {total} | {worst:.3g} | {', '.join(extra) or '—'} |" for name, changed, total, worst, extra in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_vs_peft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
