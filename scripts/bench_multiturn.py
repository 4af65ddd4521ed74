"""Multi-turn chat TTFT through a running server, with the official ``openai`` client.

Each conversation starts with the same long system prompt (cut from the prose shipped with
``tokenmill bench``), asks a question, then asks a follow-up that carries turn 1's answer. Turn 2's
prompt is turn 1's prompt plus a few dozen tokens, which is what a prefix cache serves. Prints the
median TTFT of each turn and the cached prompt tokens the server reported.

    tokenmill serve --port 8000 &                       # prefix caching on (the default)
    tokenmill serve --port 8001 --no-prefix-caching &
    python scripts/bench_multiturn.py --url http://127.0.0.1:8000 http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import statistics
import time

from openai import OpenAI

from tokenmill.bench.dataset import PROSE_PATH

QUESTIONS = ["What is this text about?", "Who is the main character?", "Where does it take place?",
             "What happens first?", "Summarize it in one sentence.", "What is the tone of the text?"]


def system_prompt(num_words: int) -> str:
    words = PROSE_PATH.read_text().split()
    return "Answer questions about this document.\n\n" + " ".join(words[:num_words])


def ttft(client: OpenAI, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int | None]:
    """Seconds to the first streamed content token, the whole answer, and the cached prompt tokens."""
    start = time.perf_counter()
    first = None
    text = ""
    cached = None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return (first or time.perf_counter()) - start, text, cached


def run(url: str, system: str, rounds: int, max_tokens: int) -> dict[str, float]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    turn1, turn2, cached2 = [], [], []
    for i in range(rounds):
        # a different first question each round, so turn 1 only shares the system prompt
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"(round {i}) {QUESTIONS[i % len(QUESTIONS)]}"}]
        t1, answer, _ = ttft(client, model, messages, max_tokens)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
        t2, _, cached = ttft(client, model, messages, max_tokens)
        turn1.append(t1)
        turn2.append(t2)
        cached2.append(cached or 0)
    return {"turn1_ttft_s": statistics.median(turn1), "turn2_ttft_s": statistics.median(turn2),
            "turn2_cached_tokens": statistics.median(cached2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", nargs="+", required=True, help="one or more servers, measured in turn")
    parser.add_argument("--system-words", type=int, default=870, help="~1,000 tokens for SmolLM2's tokenizer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    system = system_prompt(args.system_words)
    results = {url: run(url, system, args.rounds, args.max_tokens) for url in args.url}
    for url, r in results.items():
        print(f"{url}: turn 1 TTFT {r['turn1_ttft_s'] * 1000:.0f} ms, turn 2 TTFT {r['turn2_ttft_s'] * 1000:.0f} ms, "
              f"turn 2 cached tokens {r['turn2_cached_tokens']:.0f}")
    if len(results) == 2:
        a, b = results.values()
        print(f"turn 2 TTFT ratio (first / second): {a['turn2_ttft_s'] / b['turn2_ttft_s']:.2f}x")


if __name__ == "__main__":
    main()
