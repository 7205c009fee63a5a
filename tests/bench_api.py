"""Aggregate throughput of the OpenAI-compatible API at several numbers of concurrent streaming clients.

    python tests/bench_api.py                          # spawns a server (KILN_SLOTS=4), clients 1, 4, 16
    python tests/bench_api.py --slots 16 --clients 1,4,16 --max-tokens 32
    python tests/bench_api.py --url http://127.0.0.1:8000 --api-key KEY     # an already running `kiln serve`

Each client sends one streaming /v1/completions request (its own short prompt, greedy, include_usage) at the same
moment; aggregate tok/s = all completion tokens / wall time from the first request to the last [DONE]. TTFT and
per-stream decode speed are averaged over the clients. Not a test: it prints a table and asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "horse", "robot", "dragon", "teacher", "river", "mountain", "pirate", "wizard", "farmer",
         "queen", "ship", "garden", "clock", "violin", "baker", "comet", "forest", "knight", "lamp", "ocean",
         "painter", "rabbit", "sailor", "tiger", "volcano", "whale", "castle", "desert", "engine", "island"]

LAUNCHER = r"""
import socket, sys, uvicorn
from fastapi import FastAPI
from runtime_py.api import make_router
from runtime_py.artifacts import ensure_artifact
model = sys.argv[1]
app = FastAPI()
app.include_router(make_router({model: ensure_artifact(model, log=lambda *a: print(*a, file=sys.stderr))},
                               api_key=None, ctx=None))
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def spawn(model: str, slots: int, queue: int):
    env = dict(os.environ, KILN_SLOTS=str(slots), KILN_QUEUE=str(queue))
    env.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, model], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def one(c: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = usage = None
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    total = time.perf_counter() - t0
    n = usage["completion_tokens"]
    return {"ttft": first or total, "total": total, "tokens": n,
            "decode_tok_s": (n - 1) / (total - first) if first and n > 1 and total > first else None}


async def level(url: str, model: str, n_clients: int, max_tokens: int, headers: dict) -> dict:
    async with httpx.AsyncClient(timeout=3600, headers=headers) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(c, url, model, f"The {WORDS[i % len(WORDS)]}", max_tokens)
                                     for i in range(n_clients)])
        wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in res)
    dec = [r["decode_tok_s"] for r in res if r["decode_tok_s"]]
    return {"clients": n_clients, "tokens": toks, "wall": wall, "agg": toks / wall,
            "ttft": statistics.mean(r["ttft"] for r in res), "ttft_max": max(r["ttft"] for r in res),
            "stream": statistics.mean(dec) if dec else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: spawn one)")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--slots", type=int, default=4, help="KV slots of the spawned server")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    proc = None
    url = a.url
    if url is None:
        proc, url = spawn(a.model, a.slots, max(levels))
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        asyncio.run(level(url, a.model, 1, 2, headers))               # warm-up: model load, pipelines
        rows = [asyncio.run(level(url, a.model, n, a.max_tokens, headers)) for n in levels]
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
    slots = f"{a.slots} slots" if proc else "server's slots"
    print(f"\n{a.model}, greedy, {a.max_tokens} max tokens per request, {slots}, one request per client")
    print(f"{'clients':>7} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'mean ttft s':>12} {'max ttft s':>11} "
          f"{'per-stream tok/s':>17}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tokens']:>7} {r['wall']:>8.1f} {r['agg']:>10.2f} {r['ttft']:>12.2f} "
              f"{r['ttft_max']:>11.2f} {r['stream']:>17.2f}")


if __name__ == "__main__":
    main()
