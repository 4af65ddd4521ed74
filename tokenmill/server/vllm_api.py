"""vLLM's extra routes: ``POST /tokenize`` (which also answers TGI's body), ``POST /detokenize``,
``GET /version``.

``/tokenize`` answers in the shape of the API whose body it got: TGI's ``{"inputs"}`` gets TGI's list
of ``{id, text, start, stop}``; vLLM's ``{"prompt"}`` or ``{"messages"}`` gets
``{count, max_model_len, tokens, token_strs}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

import tokenmill
from tokenmill.server.openai_api import chat_prompt_ids
from tokenmill.server.protocol import ApiError, DetokenizeRequest, TokenizeRequest
from tokenmill.server.serving import get_state, off_loop

router = APIRouter()


@router.post("/tokenize", response_model=None)
async def tokenize(body: TokenizeRequest, request: Request) -> list[dict[str, Any]] | dict[str, Any]:
    state = get_state(request)
    form = body.form
    state.check_model(body.model)
    info = state.ready_engine(body.model).info
    tokenizer = info.tokenizer
    if form == "inputs":
        return await off_loop(_tgi_tokens, tokenizer, body)
    if form == "messages":
        ids = await off_loop(chat_prompt_ids, tokenizer, body.messages, body.add_generation_prompt,
                             body.chat_template_kwargs)
        if body.add_special_tokens:  # the template writes its special tokens; this adds the tokenizer's (BOS) too
            ids = tokenizer.encode("", add_special_tokens=True) + ids
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await off_loop(tokenizer.encode, body.prompt, add_special)
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


def _tgi_tokens(tokenizer: Any, body: TokenizeRequest) -> list[dict[str, Any]]:
    """TGI's shape: [{id, text, start, stop}] with character offsets into ``inputs``."""
    # tokenizers.Encoding: ids and character offsets (encode_batch releases the GIL; this runs off the event loop)
    encoding = tokenizer.backend.encode_batch([body.inputs])[0]
    pairs = list(zip(encoding.ids, encoding.offsets, strict=True))
    if body.parameters is not None and body.parameters.truncate:
        pairs = pairs[-body.parameters.truncate:]
    return [{"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in pairs]


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    state.check_model(body.model)
    tokenizer = state.ready_engine(body.model).info.tokenizer
    vocab = tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"tokens: ids must be in [0, {vocab}), got {bad[0]}", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": tokenmill.__version__}
