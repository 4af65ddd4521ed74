"""The playground's extra endpoints: what the page at ``/`` needs beyond the OpenAI and TGI APIs.

* ``POST /v1/tokenize``: ids, token strings, per-token text and character spans, with or
  without the chat template.
* ``POST /v1/playground/steps``: one generation streamed as server-sent events, one event per
  token with the top candidates of the raw distribution and of the distribution after the
  sampling controls, then why it stopped and the timings.
* ``POST /v1/playground/beam``: one beam search run with its per-step trace and final ranking.
* ``GET /v1/playground/tokenizers``: every tokenizer ``/v1/tokenize`` can use (``tokenizer`` field):
  each served model's and those given with ``--playground-tokenizer`` (playground_tokenizers.py).
* ``GET|POST /v1/playground/context``: KV-cache bytes and measured prefill / decode time against
  context length (playground_context.py).
* ``GET /v1/playground/live``: the engine's running / waiting requests, KV blocks, tokens/s and
  latency percentiles over the last minutes (playground_live.py).

They are public routes like the others (same auth, same errors); docs/api.md documents them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse

from tokenmill.engine.async_engine import EngineDeadError, RequestFailedError
from tokenmill.engine.info import grammar_compiler_for
from tokenmill.engine.structured_output import Grammar, is_allowed, num_allowed
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.server import playground_context, playground_live
from tokenmill.server.playground_tokenizers import FileTokenizer, load_playground_tokenizers
from tokenmill.server.protocol import ApiError, BeamRequest, PlaygroundTokenizeRequest, StepsRequest
from tokenmill.server.serving import (
    add_requests,
    check_admission,
    check_context,
    check_structured_outputs,
    get_state,
    merge_streams,
    off_loop,
    run_to_end,
    sse,
)

router = APIRouter(tags=["playground"])
router.include_router(playground_context.router)
router.include_router(playground_live.router)


def attach(app: FastAPI, tokenizer_paths: list[str]) -> None:
    """Load the ``--playground-tokenizer`` files (ValueError for a bad one) and keep them on the app."""
    taken = set(app.state.tokenmill.served_names)
    app.state.playground_tokenizers = {t.name: t for t in load_playground_tokenizers(tokenizer_paths, taken)}


def file_tokenizers(request: Request) -> dict[str, FileTokenizer]:
    """The ``--playground-tokenizer`` tokenizers by name (none when the app was built without attach)."""
    return getattr(request.app.state, "playground_tokenizers", {})

_REPLACEMENT_CHAR = "\ufffd"


# ---- tokenizer view ---------------------------------------------------------------------------


def token_pieces(tokenizer: Any, ids: list[int]) -> list[tuple[str, int, int]]:
    """Per token: the text it adds to ``decode(ids)`` and its [start, end) character span.

    A character split over several byte tokens (emoji, CJK) belongs to the token that completes
    it; the tokens before it add "" (start == end). Each decode covers a small window of tokens
    (the last released token as context), so the cost is linear in len(ids).
    """
    pieces: list[tuple[str, int, int]] = []
    prefix = read = 0  # ids[prefix:read] is context already released
    offset = 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=False)
        if after.endswith(_REPLACEMENT_CHAR) and i + 1 < len(ids):
            pieces.append(("", offset, offset))  # mid-character: wait for the next bytes
            continue
        new = after[len(before):]
        pieces.append((new, offset, offset + len(new)))
        offset += len(new)
        prefix, read = read, i + 1
    return pieces


def prompt_text(tokenizer: Any, prompt: str, chat_template: bool, system: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """The text the model sees: the prompt itself, or the prompt as a user turn of the chat template."""
    if not chat_template:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    # The chat template already spells out the special tokens it wants.
    return tokenizer.encode(text, add_special_tokens=not chat_template)


def render_and_encode(tokenizer: Any, prompt: str, chat_template: bool, system: str | None) -> tuple[str, list[int]]:
    """(prompt_text, its token ids): the CPU work of a playground request, run through ``off_loop``."""
    text = prompt_text(tokenizer, prompt, chat_template, system)
    return text, encode_prompt(tokenizer, text, chat_template)


@router.get("/v1/playground/tokenizers")
async def list_tokenizers(request: Request) -> dict[str, Any]:
    """Every tokenizer /v1/tokenize accepts in ``tokenizer``: the served models' (``loaded`` false while
    the model loads), then the ``--playground-tokenizer`` files."""
    state = get_state(request)
    state.check_model(None)
    out = []
    for name in state.served_names:
        engine = state.engines.get(name)
        tokenizer = engine.info.tokenizer if engine is not None and engine.info is not None else None
        out.append({"name": name, "kind": "model", "source": engine.info.model_name if tokenizer else name,
                    "loaded": tokenizer is not None, "vocab_size": tokenizer.vocab_size if tokenizer else None})
    for t in file_tokenizers(request).values():
        out.append({"name": t.name, "kind": t.kind, "source": t.path, "loaded": True,
                    "vocab_size": t.tokenizer.vocab_size})
    return {"tokenizers": out}


def pick_tokenizer(request: Request, model: str | None, tokenizer: str | None) -> tuple[str, Any]:
    """(name, Tokenizer) for a /v1/tokenize body: a served model's (``model`` or ``tokenizer`` naming one)
    or a ``--playground-tokenizer`` file's; 400 when both fields are given, 404 for an unknown name."""
    state = get_state(request)
    if tokenizer is None:
        state.check_model(model)
        return state.served_name(model), state.ready_engine(model).info.tokenizer
    if model is not None:
        raise ApiError(400, "give either model or tokenizer, not both", param="tokenizer")
    files = file_tokenizers(request)
    if tokenizer in files:
        return tokenizer, files[tokenizer].tokenizer
    try:
        state.check_model(tokenizer)
    except ApiError:
        names = ", ".join(f"`{n}`" for n in [*state.served_names, *files])
        raise ApiError(404, f"no tokenizer named `{tokenizer}`; this server has {names} "
                            "(GET /v1/playground/tokenizers)", param="tokenizer", code="tokenizer_not_found") from None
    return state.served_name(tokenizer), state.ready_engine(tokenizer).info.tokenizer


@router.post("/v1/tokenize")
async def tokenize(body: PlaygroundTokenizeRequest, request: Request) -> dict[str, Any]:
    """Split text into tokens: ids, token strings, per-token text and character spans."""
    name, tokenizer = pick_tokenizer(request, body.model, body.tokenizer)
    # off the event loop: a long text takes a while to split, and /health and open streams must not wait
    return {"model": name, **await off_loop(tokenize_view, tokenizer, body)}


def tokenize_view(tokenizer: Any, body: PlaygroundTokenizeRequest) -> dict[str, Any]:
    """The /v1/tokenize answer but its model name: tokens with their strings, text pieces and spans."""
    try:
        text = prompt_text(tokenizer, body.text, body.chat_template, add_generation_prompt=body.add_generation_prompt)
    except ValueError as exc:  # e.g. a tokenizer.json without a chat template
        raise ApiError(400, str(exc), param="chat_template") from None
    ids = encode_prompt(tokenizer, text, body.chat_template)
    strings = tokenizer.convert_ids_to_tokens(ids)
    pieces = token_pieces(tokenizer, ids)
    sources = source_spans(tokenizer, text, ids, body.chat_template)
    tokens = [{"id": tid, "token": string, "text": piece, "start": start, "end": end, "source": source,
               "added": added}
              for tid, string, (piece, start, end), (source, added) in zip(ids, strings, pieces, sources, strict=True)]
    decoded = "".join(p for p, _, _ in pieces)
    return {"text": decoded, "prompt_text": text, "count": len(ids), "num_chars": len(decoded),
            "chars_per_token": len(decoded) / len(ids) if ids else 0.0, "tokens": tokens}


def source_spans(tokenizer: Any, text: str, ids: list[int], chat_template: bool) -> list[tuple[list[int] | None, bool]]:
    """Per token: its [start, end) character span in ``text`` (the text that was tokenized) from the
    tokenizer's own alignment, and whether the tokenizer added it (BOS, [CLS]: span [0, 0]).

    Unlike start/end (spans in the decoded text), these survive normalization (lowercasing, accents
    stripped) and a SentencePiece prefix space, so different tokenizers' spans line up on the same
    text. Byte tokens of one character all span that character. None when the alignment is unknown.
    """
    encoding = tokenizer.backend.encode(text, add_special_tokens=not chat_template)
    if encoding.ids != ids:
        return [(None, False)] * len(ids)
    return [(list(o), bool(m)) for o, m in zip(encoding.offsets, encoding.special_tokens_mask, strict=True)]


# ---- step-by-step view ------------------------------------------------------------------------


@router.post("/v1/playground/steps")
async def steps(body: StepsRequest, request: Request) -> StreamingResponse:
    """Stream one generation: a ``start`` event, a ``token`` event per token, then ``done``."""
    state = get_state(request)
    state.check_model(body.model)
    params = body.to_sampling_params()
    engine = check_admission(state, 1, body.model)
    llm = engine.info
    text, ids = await off_loop(render_and_encode, llm.tokenizer, body.prompt, body.chat_template, body.system)
    check_context(engine, len(ids), params.max_tokens, "max_tokens")
    await check_structured_outputs(engine, params, "structured_outputs")
    # the page shows what the grammar masked: a copy of it here follows the tokens the engine picks
    grammar = grammar_compiler_for(llm).grammar(params.structured_outputs) if params.structured_outputs else None
    streams = await add_requests(engine, [ids], params, [text])
    start = {"type": "start", "model": state.served_name(body.model), "prompt_text": text, "prompt_token_ids": ids,
             "prompt_tokens": llm.tokenizer.convert_ids_to_tokens(ids)}
    return StreamingResponse(_step_events(engine, streams, start, grammar), media_type="text/event-stream")


async def _step_events(engine: Any, streams: list, start: dict[str, Any],
                       grammar: Grammar | None = None) -> AsyncIterator[str]:
    llm = engine.info
    yield sse(start)
    num_seen = 0
    try:
        async for _, out in merge_streams(engine, streams):
            c = out.outputs[0]
            for j, token in enumerate(c.delta_token_ids):
                event = _token_event(llm.tokenizer, c, num_seen + j, token, j, out.metrics)
                if grammar is not None:
                    _mark_masked(event, grammar, token)
                if j == len(c.delta_token_ids) - 1:
                    event["delta_text"] = c.delta_text  # text released this step (stop strings held back)
                yield sse(event)
            num_seen += len(c.delta_token_ids)
            if out.finished:
                yield sse(_done_event(c, out, llm.eos_token_ids))
    except (RequestFailedError, EngineDeadError) as exc:
        yield sse({"type": "error", "error": {"message": str(exc), "type": "internal_error"}})
    yield sse("[DONE]")


def _token_event(tokenizer: Any, c: CompletionOutput, index: int, token: int, j: int,
                 metrics: RequestMetrics) -> dict[str, Any]:
    """One generated token: the chosen id, the raw top-n and the top-n after the controls, and whether
    it was a draft token the model accepted (speculative decoding)."""
    raw: dict[int, Logprob] = c.delta_logprobs[j] if c.delta_logprobs else {}
    raw_top = _raw_candidates(raw, token)
    processed = c.processed_top[index] if c.processed_top and index < len(c.processed_top) else None
    after = None if processed is None else [
        {"id": tid, "text": tokenizer.decode([tid], skip_special_tokens=False), "prob": prob}
        for tid, prob in processed]
    chosen = raw.get(token)
    return {"type": "token", "index": index, "id": token, "token": tokenizer.convert_ids_to_tokens([token])[0],
            "text": chosen.decoded_token if chosen else tokenizer.decode([token], skip_special_tokens=False),
            "logprob": chosen.logprob if chosen else None, "rank": chosen.rank if chosen else None,
            "raw_top": raw_top, "processed_top": after, "metrics": _metrics(metrics),
            "drafted": index < len(c.drafted) and c.drafted[index]}


def _mark_masked(event: dict[str, Any], grammar: Grammar, token: int) -> None:
    """What the grammar allowed at this step: ``masked`` on each raw candidate it forbade, and how many
    tokens it allowed; then the grammar takes the chosen token."""
    row = grammar.allowed_now()
    for candidate in event["raw_top"]:
        candidate["masked"] = not is_allowed(row, candidate["id"])
    event["grammar_allowed"] = num_allowed(row)
    grammar.accept(token)


def _raw_candidates(raw: dict[int, Logprob], token: int) -> list[dict[str, Any]]:
    """The raw top-n, most likely first, plus the chosen token when it is outside them.

    Ranks are positions in the whole vocabulary: the top-n are the n most likely tokens, so
    their rank is their place in this list; the chosen token keeps the rank the engine counted.
    """
    ordered = sorted(raw.items(), key=lambda item: -item[1].logprob)
    out = []
    for position, (tid, lp) in enumerate(ordered, start=1):
        rank = lp.rank if tid == token and lp.rank is not None else position
        out.append({"id": tid, "text": lp.decoded_token, "logprob": lp.logprob, "prob": math.exp(lp.logprob),
                    "rank": rank})
    return out


def _done_event(c: CompletionOutput, out: RequestOutput, eos_token_ids: list[int]) -> dict[str, Any]:
    return {"type": "done", "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            "stop_kind": stop_kind(c, eos_token_ids), "text": c.text, "token_ids": c.token_ids,
            "cumulative_logprob": c.cumulative_logprob, "metrics": _metrics(out.metrics)}


def stop_kind(c: CompletionOutput, eos_token_ids: list[int]) -> str | None:
    """Why a sample ended, finer than finish_reason: eos | stop_token | stop_string | length | abort."""
    if c.finish_reason is None:
        return None
    if c.finish_reason != "stop":
        return c.finish_reason
    if isinstance(c.stop_reason, str):
        return "stop_string"
    if isinstance(c.stop_reason, int):
        return "stop_token"
    return "eos" if c.token_ids and c.token_ids[-1] in eos_token_ids else "stop"


def _metrics(m: RequestMetrics) -> dict[str, Any]:
    """TTFT, TPOT and tokens/s so far (seconds; tokens/s over arrival -> last token)."""
    elapsed = (m.last_token_time - m.arrival_time) if m.last_token_time is not None else None
    rate = m.num_generated_tokens / elapsed if elapsed else None
    return {"ttft_s": m.ttft, "tpot_s": m.tpot, "tokens_per_s": rate, "prompt_tokens": m.num_prompt_tokens,
            "generated_tokens": m.num_generated_tokens, "e2e_latency_s": m.e2e_latency}


# ---- beam search view -------------------------------------------------------------------------


@router.post("/v1/playground/beam")
async def beam(body: BeamRequest, request: Request) -> dict[str, Any]:
    """Run beam search to the end; returns the final ranking and the per-step candidate trace."""
    state = get_state(request)
    state.check_model(body.model)
    params = body.to_sampling_params()
    engine = check_admission(state, 1, body.model)
    llm = engine.info
    text, ids = await off_loop(render_and_encode, llm.tokenizer, body.prompt, body.chat_template, body.system)
    check_context(engine, len(ids), params.max_tokens, "max_tokens")
    streams = await add_requests(engine, [ids], params, [text])
    (out,) = await run_to_end(request, engine, streams)
    ranking = [{"rank": i + 1, "text": c.text, "token_ids": c.token_ids,
                "tokens": [llm.tokenizer.decode([t], skip_special_tokens=False) for t in c.token_ids],
                "cumulative_logprob": c.cumulative_logprob, "finish_reason": c.finish_reason,
                "stop_kind": stop_kind(c, llm.eos_token_ids)} for i, c in enumerate(out.outputs)]
    return {"model": state.served_name(body.model), "prompt_text": text, "prompt_token_ids": ids,
            "num_beams": body.num_beams,
            "ranking": ranking, "trace": beam_trace_json(out.beam_trace),
            "metrics": _metrics(out.metrics)}


def beam_trace_json(trace: list[list[dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
    """RequestOutput.beam_trace as the steps the page draws (None when the engine gave none).

    Each step lists every candidate the search scored: ``parent`` is the index of the beam it
    extends (the ``beam`` of a kept candidate of the step before; 0, the prompt, at step 1),
    ``beam`` its own index among the next step's beams when kept.
    """
    if trace is None:
        return None
    return [{"step": i + 1, "candidates": [
        {"parent": c["parent"], "beam": c["beam"], "token_id": c["token_id"], "text": c["token"],
         "cumulative_logprob": c["cumulative_logprob"], "score": c["score"], "status": c["status"]}
        for c in candidates]} for i, candidates in enumerate(trace)]
