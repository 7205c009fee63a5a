"""Continuous batching in `kiln serve` (runtime_py/scheduler.py over the `rows` program): 16 concurrent streaming
requests of different prompt lengths and max_tokens give exactly the ids each gives alone (greedy, and a seeded
sampled one), the forwards really were shared (/health's counters), and /health reports the batching. One server
with 16 slots (a subprocess, as tests/gpu/test_api.py starts it); prompts and generations are short."""
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


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ, KILN_SLOTS=str(SLOTS), KILN_QUEUE="4")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, MODEL, API_KEY], cwd=ROOT, env=env,
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
