"""Aggregate throughput of the OpenAI-compatible API at several numbers of concurrent streaming clients.

    python tests/bench_api.py                          # spawns a server (KILN_SLOTS=16), clients 1, 4, 16
    python tests/bench_api.py --slots 4 --clients 1,4,16 --max-tokens 32
    python tests/bench_api.py --kv-memory 2048tokens    # the spawned server's paged KV pool (MiB or tokens)
    python tests/bench_api.py --url http://127.0.0.1:8000 --api-key KEY     # an already running `kiln serve`

Each client sends one streaming /v1/completions request (its own short prompt, greedy, include_usage) at the same
moment (the server batches the running requests into one `rows` forward per step: runtime_py/scheduler.py); aggregate tok/s = all completion tokens / wall time from the first request to the last [DONE]. TTFT and
per-stream decode speed are averaged over the clients.

Prefix reuse (`--prefix-tokens N`, default 400; 0 skips it): one chat system prompt of about N tokens, then two
requests with different questions, one after the other. The first prefills everything; the second finds the system
prompt's full pages in the paged KV pool and prefills only the rest: its TTFT against the first's, and its
usage.prompt_tokens_details.cached_tokens. Not a test: it prints tables and asserts nothing.
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


def spawn(model: str, slots: int, queue: int, kv_memory: str | None = None):
    env = dict(os.environ, KILN_SLOTS=str(slots), KILN_QUEUE=str(queue))
    if kv_memory:
        env["KILN_KV_MEMORY"] = kv_memory
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


RULES = ["Answer in one short sentence.", "Never invent tracking numbers.", "Refer to parcels, not packages.",
         "Quote prices in euros.", "Offer the help page when unsure.", "Keep a friendly, plain tone.",
         "Do not promise delivery dates.", "Ask for the order number first.", "Mention the returns window of 30 days.",
         "Say which depot handles the parcel."]


def system_prompt(n_tokens: int) -> str:
    """About n_tokens of instructions (about 3.3 characters a token with SmolLM2's tokenizer)."""
    lines, i = [], 0
    while len(" ".join(lines)) < n_tokens * 3.3:
        lines.append(f"Rule {i + 1}: {RULES[i % len(RULES)]}")
        i += 1
    return "You are the support assistant of a parcel delivery company. " + " ".join(lines)


async def chat_ttft(c: httpx.AsyncClient, url: str, model: str, messages: list, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = usage = None
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    return {"ttft": first or time.perf_counter() - t0, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def prefix_reuse(url: str, model: str, n_tokens: int, headers: dict) -> list[dict]:
    system = {"role": "system", "content": system_prompt(n_tokens)}
    out = []
    async with httpx.AsyncClient(timeout=3600, headers=headers) as c:
        for q in ("Where is my parcel?", "Can I return a broken lamp?"):
            out.append({"question": q, **await chat_ttft(c, url, model, [system, {"role": "user", "content": q}],
                                                          2)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: spawn one)")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--slots", type=int, default=16, help="KV slots of the spawned server (16: every client of the "
                                                         "largest level decodes in the same rows forwards)")
    ap.add_argument("--kv-memory", help="the spawned server's KV pool, MiB or <n>tokens (default: kiln's)")
    ap.add_argument("--prefix-tokens", type=int, default=400, help="system prompt size for the prefix-reuse "
                                                                   "figure (0: skip it)")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    proc = None
    url = a.url
    if url is None:
        proc, url = spawn(a.model, a.slots, max(levels), a.kv_memory)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        asyncio.run(level(url, a.model, 1, 2, headers))               # warm-up: model load, pipelines
        reuse = asyncio.run(prefix_reuse(url, a.model, a.prefix_tokens, headers)) if a.prefix_tokens else []
        if reuse:
            print(f"prefix reuse: {reuse}", file=sys.stderr, flush=True)   # progress; the tables follow at the end
        rows = []
        for n in levels:
            rows.append(asyncio.run(level(url, a.model, n, a.max_tokens, headers)))
            print(f"{n} clients: {rows[-1]}", file=sys.stderr, flush=True)
        pool = httpx.get(url + "/health", timeout=30).json()["models"][a.model].get("kv")
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
    slots = f"{a.slots} slots" if proc else "server's slots"
    print(f"\n{a.model}, greedy, {a.max_tokens} max tokens per request, {slots}, one request per client; load "
          f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if pool:
        print(f"KV pool: {pool['pages_total']} pages of {pool['page_tokens']} tokens ({pool['bytes'] / 2**20:.0f} MiB), "
              f"{pool['pages_cached']} cached, {pool['page_hits']} page hits, {pool['page_evictions']} evictions")
    print(f"{'clients':>7} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'mean ttft s':>12} {'max ttft s':>11} "
          f"{'per-stream tok/s':>17}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tokens']:>7} {r['wall']:>8.1f} {r['agg']:>10.2f} {r['ttft']:>12.2f} "
              f"{r['ttft_max']:>11.2f} {r['stream']:>17.2f}")
    if reuse:
        print(f"\nprefix reuse: a {reuse[0]['prompt']}-token chat prompt (system prompt + question), then another "
              f"question after the same system prompt")
        print(f"{'request':<32} {'prompt':>7} {'cached':>7} {'ttft s':>8}")
        for r in reuse:
            print(f"{r['question']:<32} {r['prompt']:>7} {r['cached']:>7} {r['ttft']:>8.2f}")
        print(f"second / first TTFT: {reuse[1]['ttft'] / reuse[0]['ttft']:.3f}")
    if len(rows) > 1:
        print(f"aggregate tok/s, {rows[-1]['clients']} clients / {rows[0]['clients']}: "
              f"{rows[-1]['agg'] / rows[0]['agg']:.2f}x")


if __name__ == "__main__":
    main()
