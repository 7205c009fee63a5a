"""Exhaustion of the paged KV pool in `kiln serve`: with a pool of 8 pages (128 tokens), a request whose
reservation (prompt + max_tokens) does not fit beside a running one waits in the queue and then completes with the
ids it gives alone; one that could never fit gets a 400 naming the pool (kv_pool_too_small), not a 500."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

try:
    from .test_api import API_KEY, MODEL, run_async
    from .test_rows_serving import health, start_server, wait_idle
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from test_api import API_KEY, MODEL, run_async
    from test_rows_serving import health, start_server, wait_idle

PAGES, PAGE = 8, 16
N = 60   # new tokens per request: prompt + N needs 5 pages, so two such requests cannot hold their pages at once


@pytest.fixture(scope="module")
def server():
    yield from start_server({"KILN_SLOTS": "4", "KILN_QUEUE": "4", "KILN_KV_MEMORY": f"{PAGES * PAGE}tokens"})


def body(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}


def test_a_request_larger_than_the_free_pages_waits_then_completes(server):
    """Two streams whose reservations do not fit together: the second's first token comes after the first's last
    (it waited for the pages, while a request that fits would interleave), and it gives the ids it gives alone."""
    prompts = ["Once upon a time, in a land far away, there lived", "The history of the Roman empire begins"]
    order: list[int] = []   # which stream each token event came from, in arrival order

    async def stream(c, i):
        async with c.stream("POST", server + "/v1/completions", json={**body(prompts[i], N), "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            ids = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got = json.loads(line[6:])["choices"][0]["token_ids"]
                    order.extend([i] * len(got))
                    ids += got
            return ids

    async def together():
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            first = asyncio.create_task(stream(c, 0))
            while health(server)["running"] == 0:        # the first runs (its pages reserved) before the second
                await asyncio.sleep(0.05)
            second = asyncio.create_task(stream(c, 1))
            while health(server)["waiting"] == 0 and not first.done():   # the second is queued, for pages
                await asyncio.sleep(0.05)
            return await first, await second

    ids0, ids1 = run_async(together())
    assert len(ids0) == N and 1 <= len(ids1) <= N
    assert order == [0] * len(ids0) + [1] * len(ids1), "the second stream ran before the first let go of its pages"
    alone = httpx.post(server + "/v1/completions", json=body(prompts[1], N), timeout=600,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert ids1 == alone["choices"][0]["token_ids"]
    st = wait_idle(server)["kv"]
    assert st["pages_total"] == PAGES and st["pages_used"] == st["pages_reserved"] == 0


def test_a_request_that_can_never_fit_is_refused_by_name(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server + "/v1/completions", json=body("Hello", PAGES * PAGE), headers=h, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "kv_pool_too_small" and err["param"] == "max_tokens" and "--kv-memory" in err["message"]
    r = httpx.post(server + "/v1/completions", json=body("Hello", 3), headers=h, timeout=600)   # the server goes on
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
