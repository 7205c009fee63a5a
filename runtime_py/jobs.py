"""A request as the GPU worker (runtime_py/scheduler.py) sees it: `Job`, and `_Tap`, the session its generate()
drives — a Session of its own on the one-sequence path, or a paged sequence of the KV pool whose rows the worker
runs in batched forwards (runtime_py/batching.py)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    pass


@dataclass
class Job:
    """One request as the worker sees it. Events go back to the request's event loop through `queue`."""
    model_id: str
    prompt_ids: list[int]
    params: Any                    # SamplingParams
    max_tokens: int
    logprobs: int                  # top-k alternatives wanted per token; -1: no logprobs at all
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker-side state
    session: Any = None            # a Session of its own (one-sequence path) or a PagedSequence of the pool (rows)
    gen: Any = None
    prefilled: int = 0
    prefill_to: int = 0
    cached: int = 0                # prompt tokens found in the slot's cache (usage.prompt_tokens_details)
    tap: Any = None
    engine: Any = None
    # batched jobs (the `rows` program): prompt rows run up to prefill_to = len(prompt) - 1, then `pending` is the
    # token the generator feeds next (the prompt's last, then each sampled one) at position session.pos
    rows: bool = False
    pending: int | None = None
    emitted: int = 0               # tokens the generator produced so far
    limit: int = 0                 # the most tokens it will produce (generate()'s max_tokens)
    needs_logits: bool = False     # samples / logprobs / grammar: its row's logits are read back
    beams: Any = None              # runtime_py/beam.py BeamSpec: a beam search on the slot + width - 1 spare sessions
    spares: list = field(default_factory=list)

    def post(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:      # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self):
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.engine is not None:
                self.engine.wake()


class _Tap:
    """The Session as generate() sees it: keeps the last logits (for the chosen token's logprob). The worker
    prefills the prompt's whole chunks itself, one per turn, so generate() finds them held and runs only the last
    chunk (the same chunk boundaries as one forward over the uncached rest). No `gpu_sampling`: the worker steps
    one token per turn, so generate() samples on the CPU here.

    rows=True (batched jobs; the session is then a PagedSequence of the KV pool, runtime_py/pages.py): the worker
    runs the rows forward first and leaves its result in `ready`; the generator's forward([token]) at that position
    takes it (the sequence holds the token) instead of running the one-sequence programs, and next_token / logits
    return the row's. `chunk` is 1 then: in the rows program a
    one-token rest runs the same kernels as any other, so prefix reuse need not give a token back
    (runtime_py/kvcache.py reusable)."""

    def __init__(self, session, rows: bool = False):
        self.s, self.last, self.rows = session, None, rows
        self.ready = None     # (pos, token, next id, logits | None): the row the worker ran for the next forward
        self._row = None      # (next id, logits | None) of the row the last forward took

    @property
    def ctx(self):
        return self.s.ctx

    @property
    def chunk(self):
        return 1 if self.rows else self.s.chunk

    @property
    def held(self):
        return self.s.held

    def reset(self, pos: int = 0):
        self.s.reset(pos)

    def forward(self, ids):
        r, self.ready, self._row = self.ready, None, None
        if r is not None and list(ids) == [r[1]] and self.s.pos == r[0]:
            self.s.append(r[1])       # a PagedSequence (runtime_py/pages.py): its K/V is in its page now
            self._row = r[2:]
            return
        if self.rows:
            raise RuntimeError("internal: a batched request ran a forward the worker had not run for it")
        self.s.forward(ids)

    def logits(self):
        if self._row is not None:
            if self._row[1] is None:
                raise RuntimeError("internal: a batched request asked for logits the worker did not read back")
            self.last = self._row[1]
        else:
            self.last = self.s.logits()
        return self.last

    def next_token(self):
        return self._row[0] if self._row is not None else self.s.next_token()

    # speculative decoding (runtime_py/speculate.py): the score pass and rewinds, after the prompt
    @property
    def model(self):
        return self.s.model

    @property
    def pos(self):
        return self.s.pos

    def score_chunks(self, ids):
        return self.s.score_chunks(ids)
