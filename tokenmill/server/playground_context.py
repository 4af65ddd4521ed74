"""What a longer context costs, for the playground's context view.

``GET /v1/playground/context`` answers at once with the arithmetic: KV-cache bytes per token
(2 x layers x kv_heads x head_dim x the cache's element size, as the engine allocated it), the
cache's capacity and the model's maximum context, plus the last calibration if there is one.
``POST /v1/playground/context`` runs the calibration (or returns the cached one): one real request
through the engine per context length, each with a prompt of that many tokens and a few decode
steps, timed by the engine's own request metrics (prefill = first scheduled -> first token, decode
= time per output token after the first). The prompts carry a fresh ``cache_salt``, so the prefix
cache never shortens a prefill. The result is kept per model until ``refresh`` asks again.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import Field

from tokenmill.engine.info import EngineInfo
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import ApiError, Strict
from tokenmill.server.serving import add_requests, check_admission, get_state, run_to_end

router = APIRouter(tags=["playground"])

DEFAULT_POINTS = 6
DEFAULT_MAX_CONTEXT = 2048  # a calibration stays short on a CPU; ask for more with max_context_len
DECODE_TOKENS = 9  # 8 decode intervals per point
SHORTEST = 16


class ContextRequest(Strict):
    """POST /v1/playground/context."""

    model: str | None = None
    points: int = Field(DEFAULT_POINTS, ge=2, le=16)  # context lengths measured
    max_context_len: int | None = Field(None, ge=SHORTEST + DECODE_TOKENS)  # longest one (default: min(max, 2048))
    refresh: bool = False  # measure again even when a calibration with these settings is cached


@dataclass
class Point:
    context_len: int  # prompt tokens
    kv_bytes: int  # KV-cache bytes of this many tokens (the cache allocates them in whole blocks)
    prefill_s: float  # first scheduled -> first token
    decode_s_per_token: float  # mean time per output token after the first
    queue_s: float  # arrival -> first scheduled (0 unless something else was running)


@dataclass
class Calibration:
    points: list[Point]
    decode_tokens: int
    max_context_len: int
    measured_at: float  # unix time
    duration_s: float
    busy_requests: int  # requests running or waiting when it started (they share the steps)


def calibration_lengths(longest: int, points: int) -> list[int]:
    """``points`` prompt lengths from SHORTEST to ``longest``, evenly spaced on a log scale (distinct)."""
    shortest = min(SHORTEST, longest)
    if points < 2 or longest <= shortest:
        return [longest]
    ratio = math.log(longest / shortest) / (points - 1)
    lengths = sorted({round(shortest * math.exp(i * ratio)) for i in range(points)})
    if len(lengths) < points:  # a short range: log spacing rounds to duplicates, space evenly instead
        step = (longest - shortest) / (points - 1)
        lengths = sorted({round(shortest + i * step) for i in range(points)})
    return lengths


ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}  # bytes per KV element, by type name


def kv_layout(info: EngineInfo) -> dict[str, Any]:
    """Bytes per token of the engine's KV cache and what they are made of."""
    mc = info.model_config
    element = ELEMENT_SIZES[info.kv_cache_dtype]
    formula = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * element
    return {"bytes_per_token": info.kv_bytes_per_token, "num_layers": mc.num_hidden_layers,
            "num_kv_heads": mc.num_key_value_heads, "head_dim": mc.head_dim, "element_size": element,
            "dtype": info.kv_cache_dtype,
            # int8 stores a float32 scale per layer, K/V and head beside the codes
            "scale_bytes_per_token": info.kv_bytes_per_token - formula}


def capacity(info: EngineInfo) -> dict[str, Any]:
    """How much the cache holds: tokens, and how many requests of the full context fit at once."""
    tokens = info.num_blocks * info.block_size
    blocks_full = -(-info.max_model_len // info.block_size)
    return {"num_blocks": info.num_blocks, "block_size": info.block_size, "tokens": tokens,
            "bytes": info.kv_cache_bytes, "max_num_seqs": info.config.max_num_seqs,
            "full_context_requests": info.num_blocks // blocks_full}


def report(info: EngineInfo, name: str, calibration: Calibration | None) -> dict[str, Any]:
    return {"model": name, "max_model_len": info.max_model_len, "kv": kv_layout(info), "capacity": capacity(info),
            "calibration": None if calibration is None else asdict(calibration)}


class Calibrations:
    """The cached calibration of each served model, and a lock so one runs at a time per model."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[tuple[int, int], Calibration]] = {}
        self.locks: dict[str, asyncio.Lock] = {}


def calibrations(request: Request) -> Calibrations:
    state = request.app.state
    if not hasattr(state, "playground_calibrations"):
        state.playground_calibrations = Calibrations()
    return state.playground_calibrations


@router.get("/v1/playground/context")
async def get_context(request: Request, model: str | None = Query(None)) -> dict[str, Any]:
    """The KV arithmetic and capacity of ``model``'s engine, with its cached calibration (or null)."""
    state = get_state(request)
    state.check_model(model)
    engine, name = state.ready_engine(model), state.served_name(model)
    cached = calibrations(request).done.get(name)
    return report(engine.info, name, cached[1] if cached else None)


@router.post("/v1/playground/context")
async def post_context(body: ContextRequest, request: Request) -> dict[str, Any]:
    """Measure prefill and decode time at several context lengths (cached per model and settings)."""
    state = get_state(request)
    engine = check_admission(state, 1, body.model)
    name, info = state.served_name(body.model), engine.info
    # the longest prompt leaves room for the decode steps in the context and, alone, in the cache
    room = min(info.max_model_len, info.num_blocks * info.block_size) - DECODE_TOKENS
    longest = min(body.max_context_len or DEFAULT_MAX_CONTEXT, room)
    if longest < SHORTEST:
        raise ApiError(400, f"the context ({info.max_model_len} tokens) or the KV cache is too small to calibrate",
                       param="max_context_len")
    key = (longest, body.points)
    store = calibrations(request)
    async with store.locks.setdefault(name, asyncio.Lock()):
        cached = store.done.get(name)
        if cached is None or cached[0] != key or body.refresh:
            stats = engine.stats()
            busy = stats.num_running + stats.num_waiting if stats is not None else 0
            result = await calibrate(request, engine, calibration_lengths(longest, body.points), busy)
            store.done[name] = (key, result)
    return report(info, name, store.done[name][1])


async def calibrate(request: Request, engine: Any, lengths: list[int], busy: int) -> Calibration:
    """One request per length, one after the other, after a short warm-up request."""
    info: EngineInfo = engine.info
    start, started_at = time.perf_counter(), time.time()
    rng = random.Random(0)
    vocab = info.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    points = []
    for length in [SHORTEST, *lengths]:
        ids = [rng.randrange(vocab) for _ in range(length)]
        streams = await add_requests(engine, [ids], params, cache_salt=uuid.uuid4().hex)
        (out,) = await run_to_end(request, engine, streams)
        m = out.metrics
        points.append(Point(length, length * info.kv_bytes_per_token, m.first_token_time - m.scheduled_time, m.tpot, m.queue_time))
    return Calibration(points[1:], DECODE_TOKENS, lengths[-1], started_at, time.perf_counter() - start, busy)
