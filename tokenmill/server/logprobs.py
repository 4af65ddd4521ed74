"""Logprobs in the APIs' shapes: OpenAI's completions shape (also for an echoed prompt), OpenAI's chat
shape (with each token's own bytes) and vLLM's ``prompt_logprobs``.

Positions come from the engine as ``PositionLogprobs`` (token id -> Logprob: the chosen token and the
top alternatives); a position may be None (a prompt's first token: nothing precedes it).
"""

from __future__ import annotations

from typing import Any

from tokenmill.outputs import Logprob, PositionLogprobs, RequestOutput


class TokenSpeller:
    """How a response spells a token: the text its logprob entry carries (else the tokenizer's), and its bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token_str(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a byte-level piece of an emoji is one byte, not U+FFFD's three)."""
        return list(self.tokenizer.token_bytes(token_id))


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries of one position, best first."""
    return sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k]


def completion_logprobs(speller: TokenSpeller, token_ids: list[int],
                        positions: list[PositionLogprobs | None] | None, k: int,
                        offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs, text_offset (from ``offset``)."""
    if positions is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, position in zip(token_ids, positions, strict=False):
        chosen = position.get(token_id) if position else None
        text = speller.token_str(token_id, chosen)
        tokens.append(text)
        token_logprobs.append(chosen.logprob if chosen else None)
        tops.append({speller.token_str(t, lp): lp.logprob for t, lp in _top(position, k)} if position else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(speller: TokenSpeller, out: RequestOutput, k: int) -> dict[str, Any]:
    """The prompt's part of an echoed completion's logprobs (its first token's logprob is None)."""
    positions = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return completion_logprobs(speller, out.prompt_token_ids, positions, k)


def join_logprobs(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    """Two completions-shaped logprobs one after the other (an echoed prompt, then the output)."""
    return first if second is None else {key: first[key] + second[key] for key in first}


def chat_logprobs(speller: TokenSpeller, token_ids: list[int], positions: list[PositionLogprobs] | None,
                  k: int) -> dict[str, Any] | None:
    """OpenAI's chat shape: content = [{token, logprob, bytes, top_logprobs}]."""
    if positions is None:
        return None

    def entry(token_id: int, lp: Logprob | None) -> dict[str, Any]:
        text = speller.token_str(token_id, lp)
        return {"token": text, "logprob": lp.logprob if lp else None, "bytes": speller.token_bytes(token_id)}

    content = []
    for token_id, position in zip(token_ids, positions, strict=False):
        item = entry(token_id, position.get(token_id))
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(position, k)]
        content.append(item)
    return {"content": content, "refusal": None}


def vllm_prompt_logprobs(out: RequestOutput) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token, {token id: {logprob, rank, decoded_token}}; None first."""
    if out.prompt_logprobs is None:
        return None
    return [None if position is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                                   "decoded_token": lp.decoded_token}
                                           for t, lp in position.items()}
            for position in out.prompt_logprobs]
