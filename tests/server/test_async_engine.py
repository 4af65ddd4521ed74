"""AsyncEngine (the in-process, threaded engine) on the real model: streams, aborts, a failing request,
an idle loop that sleeps. The server itself runs the engine core in its own process (test_core_process.py)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.server.conftest import ENGINE, RunningServer
from tokenmill.engine.async_engine import AsyncEngine, RequestFailedError
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.sampling_params import SamplingParams

POISON_SEED = 424242


class InProcess:
    """What these tests need of a server: its engine, its metrics and a poll helper."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.wait_until = RunningServer.wait_until

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        body, _ = self.engine.metrics.render()
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples


@pytest.fixture(scope="module")
def server():
    engine = AsyncEngine.from_config(ENGINE, EngineMetrics())
    engine.start()
    yield InProcess(engine)
    engine.shutdown()


def _ids(server, text: str = "The capital of France is") -> list[int]:
    return server.engine.info.tokenizer.encode(text)


def test_abort_from_a_coroutine_ends_the_stream_and_frees_blocks(server):
    engine = server.engine

    async def main() -> list:
        stream = await engine.add_request(_ids(server), SamplingParams(max_tokens=200, ignore_eos=True))
        outputs = []
        async for out in stream:
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort(stream.request_id)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 200
    assert server.wait_until(lambda: engine.engine.stats().kv_blocks_used == 0, timeout=30)


def test_rejected_request_raises_value_error(server):
    async def main() -> None:
        await server.engine.add_request(_ids(server) * 200, SamplingParams(max_tokens=5))

    with pytest.raises(ValueError, match="512"):
        asyncio.run(main())


def test_a_request_that_breaks_the_engine_fails_alone(server, monkeypatch):
    runner = server.engine.engine.core.runner
    real_execute = runner.execute

    def execute(plan):  # the poisoned request breaks the forward, like a bug would
        if any(s.request.params.seed == POISON_SEED for s in plan.scheduled):
            raise RuntimeError("boom")
        return real_execute(plan)

    monkeypatch.setattr(runner, "execute", execute)
    errors_before = server.metrics()['tokenmill_requests_total{finish_reason="error"}']

    async def main() -> list:
        good = await server.engine.add_request(_ids(server), SamplingParams(max_tokens=8, ignore_eos=True))
        good_outputs = [await anext(aiter(good))]  # the good request is running
        bad = await server.engine.add_request(_ids(server), SamplingParams(max_tokens=3, seed=POISON_SEED))
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in bad:
                pass
        good_outputs += [out async for out in good]
        return good_outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert len(outputs[-1].outputs[0].token_ids) == 8
    assert server.metrics()['tokenmill_requests_total{finish_reason="error"}'] == errors_before + 1


def test_idle_loop_thread_sleeps(server):
    thread = server.engine._thread
    assert server.wait_until(lambda: not server.engine.engine.has_unfinished(), timeout=60)
    time.sleep(0.2)

    def cpu_ticks() -> int:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

    before = cpu_ticks()
    time.sleep(1.0)
    assert cpu_ticks() - before <= 2, "the engine thread busy-loops while idle"
    assert os.sysconf("SC_CLK_TCK") >= 100
