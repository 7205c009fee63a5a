"""The OpenAI API's plumbing between a route and the GPU worker (runtime_py/api.py routes, runtime_py/scheduler.py
worker): per-model host-side info (tokenizer, template, context: no GPU), the prompt's token budget, and a request's
events — waited for while watching the client (a client that goes away cancels its job: the worker frees its KV at
once), collected for a plain response or streamed as SSE."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .jobs import Job
from .schemas import APIError, sse

DISCONNECT_POLL_S = 0.5          # how often a request waiting on the worker checks that its client is still there
KEEPALIVE_S = 15                 # a stream waiting (queued, long prefill) sends an SSE comment this often

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------------------------------------------------------
# per-model host-side info: tokenizer, template, context (no GPU; loaded in a thread on first use)


@dataclass
class ModelInfo:
    id: str
    dir: Path
    manifest: dict
    tokenizer: Any
    ctx: int
    created: int


def load_info(model_id: str, art: Path, ctx: int | None) -> ModelInfo:
    from compiler.manifest import MANIFEST_FILE, read_manifest

    from .model import DEFAULT_CTX
    from .tokenizer import Tokenizer
    m = read_manifest(art)
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    n_ctx = min(ctx or DEFAULT_CTX, m["config"]["context_length"])
    return ModelInfo(model_id, art, m, tok, n_ctx, int((art / MANIFEST_FILE).stat().st_mtime))


def budget(info: ModelInfo, ids: list[int], max_tokens: int | None, param: str) -> int:
    if not ids:
        raise APIError(400, "The prompt is empty: there is nothing to continue.", param=param,
                       code="invalid_value")
    vocab = info.tokenizer.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"Invalid token id {bad} in '{param}' (vocabulary size {vocab}).", param=param,
                       code="invalid_value")
    n = len(ids)
    if max_tokens is None:
        max_tokens = info.ctx - n            # the table's default: until EOS, a stop string or the context end
        if max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {info.ctx} tokens. However, your "
                                f"{param} resulted in {n} tokens. Please reduce the length of the {param}.",
                           param=param, code="context_length_exceeded")
    elif n + max_tokens > info.ctx:
        raise APIError(400, f"This model's maximum context length is {info.ctx} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the {param}, {max_tokens} in the completion). "
                            f"Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")
    return max_tokens


# ------------------------------------------------------------------------------------------------------------------
# a request's events from the worker


async def next_event(request: Request, job: Job, keepalive: float | None = None):
    """The next worker event; None (and the job cancelled) when the client has gone away; ("tick",) after
    `keepalive` seconds without one."""
    t0 = time.monotonic()
    while True:
        try:
            return await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None
            if keepalive is not None and time.monotonic() - t0 >= keepalive:
                return ("tick",)

async def collect(request: Request, job: Job):
    """Non-streaming: run to the end; (Done, [logprob entries]) or raise the job's error."""
    lps = []
    try:
        while True:
            ev = await next_event(request, job)
            if ev is None:
                raise APIError(499, "client disconnected")
            if ev[0] == "token":
                if ev[3] is not None:
                    lps.append(ev[3])
            elif ev[0] == "done":
                return ev[1], lps
            else:
                raise ev[1]
    finally:
        job.cancel()     # no-op when finished; frees the slot when the handler itself was cancelled

def stream(request: Request, job: Job, make_chunk, first: list[dict], finish_chunk, usage_chunk,
           include_usage: bool):
    async def body():
        try:
            for c in first:
                yield sse(c)
            while True:
                ev = await next_event(request, job, KEEPALIVE_S)
                if ev is None:
                    return
                if ev[0] == "tick":
                    yield ": keep-alive\n\n"      # an SSE comment: clients ignore it, proxies see traffic
                elif ev[0] == "token":
                    _, tid, text, lp = ev
                    c = make_chunk(text, [tid] if tid >= 0 else [], lp) if text or lp is not None else None
                    if c is not None:          # None: held back (a tool-call reply is sent whole at the end)
                        yield sse(c)
                elif ev[0] == "done":
                    done = ev[1]
                    for c in finish_chunk(done):
                        yield sse(c)
                    if include_usage:
                        yield sse(usage_chunk(len(job.prompt_ids), len(done.ids), job.cached, done.timings))
                    break
                else:
                    yield sse(ev[1].body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()     # client gone (generator closed / cancelled) or finished: the slot is freed
    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
