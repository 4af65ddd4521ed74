"""Resident memory of an OpenAI-compatible server after a burst of concurrent requests (docs/memory.md).

Starts the server command, waits for /health, sends ``--requests`` concurrent completions of
``--max-tokens`` tokens each (greedy, EOS ignored where the server supports it), then reads the memory
of the server's whole process tree: RSS (what `ps` shows, shared libraries counted in every process)
and PSS (shared pages split between the processes that map them: the sum is what the tree costs).

    .venv/bin/python scripts/measure_server_memory.py --port 8091 -- \
        .venv/bin/tokenmill serve --port 8091 --kv-cache-memory 0.3515625
    .venv/bin/python scripts/measure_server_memory.py --port 8092 -- \
        /tmp/llama.cpp-anchor/build/bin/llama-server -m MODEL.gguf --port 8092 -np 32 -c 16384 -t 2
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import httpx
import psutil

PROMPT = "Write a long story about a lighthouse keeper and the ships that pass in the night."


def tree_memory(pid: int) -> list[tuple[int, str, float, float]]:
    """(pid, name, RSS MiB, PSS MiB) of the process and its descendants."""
    root = psutil.Process(pid)
    rows = []
    for p in [root, *root.children(recursive=True)]:
        full = p.memory_full_info()
        rows.append((p.pid, " ".join(p.cmdline()[:3])[-60:], full.rss / 2**20, full.pss / 2**20))
    return rows


async def burst(base: str, requests: int, max_tokens: int) -> int:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=3600) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        replies = await asyncio.gather(*(client.post(f"{base}/v1/completions", json={**body, "model": model})
                                         for _ in range(requests)))
    return sum(r.json()["usage"]["completion_tokens"] for r in replies if r.status_code == 200)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise SystemExit("server did not become healthy")
        idle = tree_memory(server.pid)
        tokens = asyncio.run(burst(base, args.requests, args.max_tokens))
        time.sleep(1)
        loaded = tree_memory(server.pid)
        print(f"{' '.join(command)}\n{args.requests} requests, {tokens} tokens generated")
        for label, rows in (("idle", idle), ("after", loaded)):
            for pid, name, rss, pss in rows:
                print(f"  {label:5s} pid {pid:7d} {name:60s} RSS {rss:7.1f} MiB  PSS {pss:7.1f} MiB")
            print(f"  {label:5s} total RSS {sum(r[2] for r in rows):7.1f} MiB  PSS {sum(r[3] for r in rows):7.1f} MiB")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
