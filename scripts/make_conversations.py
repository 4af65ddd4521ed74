"""A multi-turn workload for `tokenmill bench --dataset`: C conversations x T turns, turn-major.

Each row's prompt is a whole conversation so far, through the model's chat template (a shared system prompt,
then user and assistant turns; the assistant turns are fixed text). Rows are ordered turn by turn, so a
conversation's turn t+1 is queued after every conversation's turn t: the workload of docs/scale_out.md
that compares prefix routing with round-robin.

    python scripts/make_conversations.py --tag run1 --conversations 15 --turns 4 [--long] out.jsonl
"""

from __future__ import annotations

import argparse
import json

from tokenmill.model.source import load_tokenizer

TOPICS = ["gardening", "astronomy", "cooking", "chess", "sailing", "history", "music", "running", "painting",
          "physics", "poetry", "cycling", "baking", "photography", "geology", "birds", "coffee", "knitting"]


def user_turn(c: int, t: int, long: bool) -> str:
    topic = TOPICS[c % len(TOPICS)]
    text = (f"Conversation {c}, question {t + 1}: tell me one more thing about {topic} that a beginner in "
            f"{topic} should know, and why it matters for {topic}.")
    if long:  # ~330 tokens of notes pasted by the user
        text += f" Here are my notes on {topic} so far, part {t + 1}: " + " ".join(
            f"Note {k}: in {topic}, step {k} of lesson {t + 1} was about patience, tools and practice."
            for k in range(12))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tag", default="0", help="goes into the system prompt: runs with different tags share no cache")
    parser.add_argument("--conversations", type=int, default=15)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--long", action="store_true", help="user turns of ~330 tokens instead of ~70")
    parser.add_argument("out")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    system = (f"Session {args.tag}. You are a helpful, patient assistant. Answer in two or three sentences, "
              "plainly, and ask a follow-up question at the end of every answer.")
    conversations = [[{"role": "system", "content": system}] for _ in range(args.conversations)]
    with open(args.out, "w", encoding="utf-8") as f:
        for t in range(args.turns):
            for c, messages in enumerate(conversations):
                messages.append({"role": "user", "content": user_turn(c, t, args.long)})
                f.write(json.dumps({"prompt": tokenizer.apply_chat_template(messages),
                                    "output_len": args.output_len}) + "\n")
                topic = TOPICS[c % len(TOPICS)]
                messages.append({"role": "assistant", "content": (
                    f"Here is one thing about {topic} for question {t + 1}: start small, practice often, and "
                    f"learn the basic words of {topic}. What would you like next?")})
    print(f"{args.out}: {args.conversations * args.turns} prompts")


if __name__ == "__main__":
    main()
