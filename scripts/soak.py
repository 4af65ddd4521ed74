"""Endurance run of ``tokenmill serve``: many concurrent streams of mixed requests, random disconnects.

Starts the server itself (so it can read its memory and kill it), keeps ``--concurrency`` clients busy for
``--duration`` seconds with completions and chats of mixed lengths and parameters, streamed or not, n of 1 or
2, of which a share are dropped by the client mid-way; then waits for the engine to drain and reports:
requests served, client disconnects, 4xx / 5xx / transport errors, the RSS of the server and its engine-core
process at the start (after a warm-up) and the end, and the KV cache blocks still in use (from /metrics).
With ``--kill-restart`` it then kills the server with SIGKILL under load, checks that its engine-core process
goes too, restarts it and reports the seconds until /health answers 200. SIGINT or SIGUSR1 ends the load early;
the report then covers the time run.

    nice -n 19 .venv/bin/python scripts/soak.py --duration 1800 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

STOP = {"requested": False}  # SIGINT / SIGUSR1: end the load now and report what was measured

WORDS = ("the engine schedules decodes and prefill chunks under a token budget while the cache hands out "
         "blocks to every sequence that asks and takes them back when a client goes away").split()


@dataclass
class Tally:
    served: int = 0
    disconnected: int = 0  # dropped on purpose by the client
    client_errors: int = 0  # 4xx: none expected, every request is valid
    server_errors: int = 0  # 5xx: none expected
    transport_errors: int = 0
    tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants (the server and its engine-core process), in MB (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _rss_kb(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, StopIteration):
            continue
    return total / 1024


def rss_by_process_mb(pid: int) -> dict[str, float]:
    """RSS in MB of the server (``server``) and each process below it (``core``, ``resource tracker``, ``pid N``)."""
    out: dict[str, float] = {}
    for i, p in enumerate([pid, *children(pid)]):
        try:
            kb = _rss_kb(p)
        except (OSError, StopIteration):
            continue
        out["server" if i == 0 else _child_name(p)] = round(kb / 1024, 1)
    return out


def _rss_kb(pid: int) -> int:
    """VmRSS of a process in kB (OSError when it is gone, StopIteration for a zombie without the line)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def _child_name(pid: int) -> str:
    """``core`` for the engine-core process, ``resource tracker`` for multiprocessing's, else ``pid N``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    if b"resource_tracker" in cmdline:
        return "resource tracker"
    return "core" if b"spawn_main" in cmdline else f"pid {pid}"


def sample_rss(pid: int, every: float, samples: list[dict[str, object]], done: threading.Event) -> None:
    """Append ``{"t": seconds, <process>: MB, ...}`` every ``every`` seconds until ``done`` is set."""
    start = time.monotonic()
    while not done.wait(every):
        samples.append({"t": round(time.monotonic() - start), **rss_by_process_mb(pid)})


def children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--model", args.model,
           "--max-num-seqs", str(args.max_num_seqs), *args.serve_args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.log, "ab"))  # noqa: SIM115


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until /health answers 200 (None if the process exits or timeout passes)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return None


def random_request(rng: random.Random) -> tuple[str, dict]:
    words = rng.choice([4, 12, 40, 120, 300])
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    params = {"max_tokens": rng.choice([1, 8, 32, 96, 200]), "stream": rng.random() < 0.6,
              "temperature": rng.choice([0.0, 0.7, 1.0]), "n": rng.choice([1, 1, 1, 2])}
    if rng.random() < 0.3:
        params |= {"top_p": 0.9, "top_k": 40, "presence_penalty": 0.5, "seed": rng.randrange(1 << 31)}
    if rng.random() < 0.2:
        params |= {"stop": ["."], "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        return "/v1/completions", {"prompt": text, **params}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **params}


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random, disconnect_rate: float,
                      tally: Tally) -> None:
    route, body = random_request(rng)
    drop_after = rng.randint(0, 5) if rng.random() < disconnect_rate else None  # events (stream) / 0.1 s units
    try:
        if body["stream"]:
            async with client.stream("POST", url + route, json=body) as r:
                tally.statuses[str(r.status_code)] = tally.statuses.get(str(r.status_code), 0) + 1
                if r.status_code != 200:
                    _count_error(tally, r.status_code, (await r.aread()).decode(errors="replace"))
                    return
                events = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        events += 1
                        if drop_after is not None and events > drop_after:
                            tally.disconnected += 1
                            return  # leaving the block closes the connection mid-stream
                tally.served += 1
                tally.tokens += events
        else:
            task = asyncio.ensure_future(client.post(url + route, json=body))
            if drop_after is not None:
                await asyncio.sleep(0.1 * drop_after)
                if not task.done():
                    task.cancel()
                    tally.disconnected += 1
                    return
            r = await task
            tally.statuses[str(r.status_code)] = tally.statuses.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                _count_error(tally, r.status_code, r.text)
                return
            tally.served += 1
            tally.tokens += r.json()["usage"]["completion_tokens"]
    except (httpx.TransportError, httpx.StreamError) as exc:
        tally.transport_errors += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
    except asyncio.CancelledError:
        tally.disconnected += 1


def _count_error(tally: Tally, status: int, text: str) -> None:
    if status >= 500:
        tally.server_errors += 1
    else:
        tally.client_errors += 1
    if len(tally.errors) < 20:
        tally.errors.append(f"{status}: {text[:300]}")


async def load(url: str, concurrency: int, seconds: float, disconnect_rate: float, seed: int,
               tally: Tally) -> None:
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(timeout=600) as client:
            while time.monotonic() < deadline and not STOP["requested"]:
                await one_request(client, url, rng, disconnect_rate, tally)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("tokenmill_kv_cache", "tokenmill_num_requests")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def drain(url: str, timeout: float = 120) -> dict[str, float]:
    """/metrics once nothing runs or waits (aborted requests are freed within a step)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m.get("tokenmill_num_requests_running", 1) == 0 and m.get("tokenmill_num_requests_waiting", 1) == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(1)


def kill_restart(args: argparse.Namespace, proc: subprocess.Popen, url: str, port: int) -> dict[str, object]:
    """SIGKILL the server under load; the engine-core process must go too; restart: seconds to healthy."""
    tally = Tally()
    core = children(proc.pid)
    loop = asyncio.new_event_loop()
    task = loop.create_task(load(url, args.concurrency, 15, 0.0, args.seed + 1, tally))
    loop.run_until_complete(asyncio.sleep(8))  # mid-load
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loop.run_until_complete(task)
    loop.close()
    start = time.monotonic()
    orphans = core
    while orphans and time.monotonic() - start < 30:
        orphans = [p for p in orphans if _alive(p)]
        time.sleep(0.2)
    core_gone_s = time.monotonic() - start
    restart = start_server(args, port)
    healthy_s = wait_healthy(url, restart, args.load_timeout)
    ok = healthy_s is not None and httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                                              timeout=120).status_code == 200
    stop(restart)
    return {"core_process_gone_after_s": round(core_gone_s, 2), "orphaned_core_pids": orphans,
            "seconds_to_healthy_after_restart": None if healthy_s is None else round(healthy_s, 2),
            "serves_after_restart": ok, "client_errors_while_killed": tally.transport_errors}


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800, help="seconds of load (default 30 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect-rate", type=float, default=0.2, help="share of requests the client drops")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before the start RSS")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-restart", action="store_true", help="then SIGKILL under load and restart")
    parser.add_argument("--load-timeout", type=float, default=1800, help="seconds the model may take to load")
    parser.add_argument("--log", default="soak-server.log", help="the server's stderr")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--rss-every", type=float, default=60, help="seconds between RSS samples per process")
    parser.add_argument("serve_args", nargs="*", help="extra flags for tokenmill serve (after --)")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda *_: STOP.update(requested=True))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        load_s = wait_healthy(url, proc, args.load_timeout)
        if load_s is None:
            print(f"the server did not become healthy; see {args.log}", file=sys.stderr)
            return 1
        tally = Tally()
        asyncio.run(load(url, args.concurrency, args.warmup, args.disconnect_rate, args.seed, tally))
        rss_start = tree_rss_mb(proc.pid)
        samples: list[dict[str, object]] = [{"t": 0, **rss_by_process_mb(proc.pid)}]
        sampling = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, args.rss_every, samples, sampling), daemon=True)
        sampler.start()
        started = time.monotonic()
        asyncio.run(load(url, args.concurrency, args.duration, args.disconnect_rate, args.seed + 7, tally))
        elapsed = time.monotonic() - started
        sampling.set()
        m = drain(url)
        rss_end = tree_rss_mb(proc.pid)
        blocks_total = m.get("tokenmill_kv_cache_tokens", 0) / 16  # default --block-size
        report: dict[str, object] = {
            "duration_s": round(elapsed), "stopped_early": STOP["requested"], "concurrency": args.concurrency,
            **asdict(tally),
            "requests_per_s": round(tally.served / elapsed, 2),
            "rss_mb_start": round(rss_start), "rss_mb_end": round(rss_end),
            "rss_change_pct": round(100 * (rss_end - rss_start) / rss_start, 1),
            "rss_mb_samples": samples,
            "kv_cache_usage_ratio_end": m.get("tokenmill_kv_cache_usage_ratio"),
            "kv_blocks_in_use_end": round(m.get("tokenmill_kv_cache_usage_ratio", 0) * blocks_total),
            "running_end": m.get("tokenmill_num_requests_running"), "waiting_end": m.get("tokenmill_num_requests_waiting"),
            "load_average": os.getloadavg(),
        }
        _write(report, args.json)
        if args.kill_restart and not STOP["requested"]:
            report["kill_restart"] = kill_restart(args, proc, url, port)
            _write(report, args.json)
    finally:
        stop(proc)
    return 0 if tally.server_errors == 0 else 1


def _write(report: dict[str, object], path: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if path:
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
