"""Continuous batching in `kiln serve` (runtime_py/scheduler.py over the `rows` program and the paged KV pool): 16
concurrent streaming requests of different prompt lengths and max_tokens give exactly the ids each gives alone
(greedy, and a seeded sampled one), the forwards really were shared (/health's counters), and /health reports the
batching; 8 clients that disconnect mid-stream leave the pool's pages where they were. One server with 16 slots (a
subprocess, as tests/gpu/test_api.py starts it); prompts and generations are short."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

try:
    from .test_api import API_KEY, LAUNCHER, MODEL, ROOT, STARTUP_TIMEOUT_S, run_async, sse_events
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from test_api import API_KEY, LAUNCHER, MODEL, ROOT, STARTUP_TIMEOUT_S, run_async, sse_events

SLOTS = 16
WORDS = ["cat", "dog", "horse", "robot", "dragon", "teacher", "river", "mountain", "pirate", "wizard", "farmer",
         "queen", "ship", "garden", "clock", "violin"]
# (prompt, max_tokens, extra body): prompts of 2 to ~30 tokens, 1 to 5 new tokens, one seeded sampled request
REQUESTS = [(("The " + w + " and the") * (1 + i % 4) + " " + WORDS[-1 - i], 1 + i % 5, {}) for i, w in enumerate(WORDS)]
REQUESTS[7] = (REQUESTS[7][0], 4, {"temperature": 0.9, "top_k": 20, "seed": 1234})


def start_server(env: dict):
    """A `kiln serve` subprocess with `env` added (KILN_SLOTS, KILN_KV_MEMORY, ...); yields its URL, then stops it."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, MODEL, API_KEY], cwd=ROOT, env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        pytest.fail(f"server did not start (printed {line!r})")
    url = f"http://127.0.0.1:{int(line)}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("server did not answer /health")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    yield from start_server({"KILN_SLOTS": str(SLOTS), "KILN_QUEUE": "4"})


async def complete(c: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, extra: dict) -> list[int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, **extra}
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        lines = [line async for line in r.aiter_lines()]
    events = sse_events(lines)
    assert all("choices" in e for e in events), events
    return [t for e in events for t in e["choices"][0]["token_ids"]]


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()["models"][MODEL]


def wait_idle(url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = health(url)
        if st["running"] == 0 and st["waiting"] == 0:
            return st
        time.sleep(0.2)
    raise AssertionError(f"server still busy after {timeout}s: {health(url)}")


def test_concurrent_requests_give_the_ids_of_each_alone(server):
    async def together():
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*[complete(c, server, *r) for r in REQUESTS])

    async def one_by_one():
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return [await complete(c, server, *r) for r in REQUESTS]

    before = health(server)   # the model loads on the first request: counters 0 until then
    batched = run_async(together())
    st = health(server)
    assert st["batching"] is True and st["running"] == 0 and st["waiting"] == 0
    forwards, rows = st["rows_forwards"] - before["rows_forwards"], st["rows_run"] - before["rows_run"]
    assert rows >= 4 * forwards, f"{rows} rows in {forwards} forwards: the requests were not batched"
    alone = run_async(one_by_one())
    for (prompt, n, extra), got, want in zip(REQUESTS, batched, alone):
        assert got == want, (prompt, n, extra)
        assert 1 <= len(got) <= n


def test_disconnecting_clients_leave_the_pool_where_it_was(server):
    async def leave(c: httpx.AsyncClient, prompt: str):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
        async with c.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: {")
                if n >= 2:
                    return n   # the client goes away mid-stream

    async def run():
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*[leave(c, f"A story about a {w}:") for w in WORDS[:8]])

    before = wait_idle(server)
    assert all(n == 2 for n in run_async(run()))
    after = wait_idle(server, timeout=60)
    kv0, kv = before["kv"], after["kv"]
    assert kv is not None and kv["pages_total"] >= 1
    keys = ("pages_used", "pages_reserved", "pages_total")
    assert {k: kv[k] for k in keys} == {k: kv0[k] for k in keys} and kv["pages_used"] == kv["pages_reserved"] == 0
    assert kv["pages_free"] + kv["pages_cached"] == kv["pages_total"]
