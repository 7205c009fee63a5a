"""The GPU worker behind `kiln serve`: one thread per router owns every model load and forward pass (`Engine`).

Each model has up to `slots` Sessions (KV caches, created on demand and reused); an admitted request gets one for
itself and keeps it to the end, so concurrent requests never share state. A slot keeps the ids it holds after its
request, and a new request goes to the free slot sharing the longest prefix with its prompt (least recently used
otherwise; runtime_py/kvcache.py `pick_slot`), whose cached prefix it does not prefill again (`Job.cached`, reported
as usage.prompt_tokens_details.cached_tokens). The worker interleaves the active requests
round-robin, one step each per turn: a step is one prefill chunk of the prompt or one decode token
(`session.forward([tok])`), so every active stream progresses and a long prompt delays the others by at most one
prefill chunk. Requests beyond the slots wait, FIFO, in a bounded queue (`max_queue` per model); `submit` raises
Overloaded when slots + queue are full. A client that disconnects (or a stream that is closed) marks its Job
cancelled: the worker drops it before its next step and returns its slot. A beam search (use_beam_search,
runtime_py/beam_sessions.py) takes its slot plus width - 1 spare sessions (kept by the model for the next beam
request, never slots) and advances one beam step, K forwards, per turn. Sequences are not batched into the same
kernels (the compiled programs take one sequence), so aggregate throughput is that of one stream, shared.

Events go back to each request's event loop as tuples: ("token", id, text, logprob | None), ("done", Done),
("error", APIError).
"""
from __future__ import annotations

import asyncio
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ContextOverflowError, KilnError

from .kvcache import pick_slot, reuse_prefix
from .schemas import APIError, to_api_error


# ------------------------------------------------------------------------------------------------------------------
# the GPU worker


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
    session: Any = None
    gen: Any = None
    prefilled: int = 0
    prefill_to: int = 0
    cached: int = 0                # prompt tokens found in the slot's cache (usage.prompt_tokens_details)
    tap: Any = None
    engine: Any = None
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
    one token per turn, so generate() samples on the CPU here."""

    def __init__(self, session):
        self.s, self.last = session, None

    @property
    def ctx(self):
        return self.s.ctx

    @property
    def chunk(self):
        return self.s.chunk

    @property
    def held(self):
        return self.s.held

    def reset(self, pos: int = 0):
        self.s.reset(pos)

    def forward(self, ids):
        self.s.forward(ids)

    def logits(self):
        self.last = self.s.logits()
        return self.last

    def next_token(self):
        return self.s.next_token()

    # speculative decoding (runtime_py/speculate.py): the score pass and rewinds, after the prompt
    @property
    def model(self):
        return self.s.model

    @property
    def pos(self):
        return self.s.pos

    def score_chunks(self, ids):
        return self.s.score_chunks(ids)


def _drafter(spec: str | None):
    if spec is None:
        return None
    from .speculate import NgramDrafter
    return NgramDrafter()


class _GPUModel:
    """One loaded model and its KV slots: sessions created on demand (at most `slots`), each keeping the ids it
    holds after its request (runtime_py/kvcache.py), so a later request with the same prefix prefills only the
    rest."""

    def __init__(self, model):
        self.model = model
        self.sessions: list = []          # every slot, busy or free
        self.free: list = []
        self.clock = 0                    # slot use counter: session.last_used, for LRU
        self.spare: list = []             # beam searches' extra sessions (not slots: they hold no reusable prefix)

    @property
    def n_sessions(self) -> int:
        return len(self.sessions)


class Engine:
    """Owns the GPU: one worker thread runs every model load and forward pass, round-robin over active jobs."""

    def __init__(self, infos: dict, artifacts: dict[str, Path], ctx: int | None, slots: int,
                 max_queue: int):
        self.artifacts, self.ctx, self.slots, self.max_queue = artifacts, ctx, slots, max_queue
        self._info = infos                           # model id -> () -> ModelInfo (cached)
        self._cv = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {m: deque() for m in artifacts}
        self._admitted: dict[str, int] = {m: 0 for m in artifacts}   # waiting + active, per model
        self._active: list[Job] = []                 # worker thread only (len read by stats())
        self._gpu: dict[str, _GPUModel] = {}         # worker thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        self.speculate: str | None = None              # "ngram": each job gets a prompt-lookup drafter

    # -- any thread -------------------------------------------------------------------------------------------
    def submit(self, job: Job):
        with self._cv:
            if self._admitted[job.model_id] >= self.slots + self.max_queue:
                raise Overloaded()
            self._admitted[job.model_id] += 1
            job.engine = self
            self._waiting[job.model_id].append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kiln-gpu", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wake(self):
        with self._cv:
            self._cv.notify()

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify()

    def stats(self) -> dict:
        """Per model: `running` (= `active`) requests generating, `waiting` (= `queued`) for a slot, and the KV
        slots: `slots` allowed, `sessions` allocated, `slots_busy`, `cached_tokens` each allocated slot holds."""
        with self._cv:
            active = {}
            for j in list(self._active):
                active[j.model_id] = active.get(j.model_id, 0) + 1
            out = {}
            for m in self.artifacts:
                g = self._gpu.get(m)
                sessions = list(g.sessions) if g else []
                run, wait = active.get(m, 0), len(self._waiting[m])
                out[m] = {"loaded": g is not None, "slots": self.slots, "sessions": len(sessions),
                          "slots_busy": len(sessions) - len(g.free) if g else 0,
                          "cached_tokens": [len(s.held) for s in sessions],
                          "running": run, "waiting": wait, "active": run, "queued": wait,
                          "max_queue": self.max_queue}
            return out

    # -- worker thread ----------------------------------------------------------------------------------------
    def _run(self):
        while True:
            try:
                if self._turn():
                    return
            except Exception as e:  # noqa: BLE001 — a bug here must not leave every client hanging
                traceback.print_exc()
                for job in list(self._active):
                    try:
                        self._fail(job, e)
                    except Exception:  # noqa: BLE001
                        pass

    def _turn(self) -> bool:
        """Admit waiting jobs into free slots, then one step for every active job. True: stop the worker."""
        starts = []
        with self._cv:
            while not self._stop and not self._active and not any(self._waiting.values()):
                self._cv.wait()
            if self._stop:
                return True
            for mid, q in self._waiting.items():
                for j in [j for j in q if j.cancelled.is_set()]:   # gave up while waiting
                    q.remove(j)
                    self._admitted[mid] -= 1
                busy = sum(1 for j in self._active if j.model_id == mid)
                while q and busy < self.slots:
                    starts.append(q.popleft())
                    busy += 1
            self._active.extend(starts)
        for job in starts:
            self._start(job)
        for job in list(self._active):
            self._step(job)
        return False

    def _finish(self, job: Job, item=None):
        if item is not None:
            job.post(item)
        if job.gen is not None:
            try:
                job.gen.close()
            except Exception:  # noqa: BLE001
                pass
            job.gen = None
        if job.session is not None:
            self._gpu[job.model_id].free.append(job.session)
            job.session = None
        if job.spares:
            self._gpu[job.model_id].spare.extend(job.spares)
            job.spares = []
        with self._cv:
            if job in self._active:
                self._active.remove(job)
                self._admitted[job.model_id] -= 1

    def _fail(self, job: Job, exc: Exception):
        if isinstance(exc, ContextOverflowError):      # the user's prompt (checked before; kept as a safety net)
            err = to_api_error(exc)
        else:                                          # the server's own failure: model load, GPU, ...
            if not isinstance(exc, KilnError):
                traceback.print_exc()
            err = APIError(500, f"{type(exc).__name__}: {exc}" if isinstance(exc, KilnError)
                           else f"internal server error: {type(exc).__name__}: {exc}")
        self._finish(job, ("error", err))

    def _start(self, job: Job):
        from .generate import generate
        if job.cancelled.is_set():
            return self._finish(job)
        try:
            g = self._gpu.get(job.model_id)
            if g is None:
                from .model import Model
                g = self._gpu[job.model_id] = _GPUModel(Model(self.artifacts[job.model_id]))
            s = pick_slot(g.free, job.prompt_ids, can_grow=len(g.sessions) < self.slots)
            if s is None:
                s = g.model.session(self.ctx)
                g.sessions.append(s)
            else:
                g.free.remove(s)
            g.clock += 1
            s.last_used = g.clock
            job.session = s
            info = self._info[job.model_id]()
            n, chunk = len(job.prompt_ids), s.chunk
            job.cached = job.prefilled = reuse_prefix(s, job.prompt_ids)
            # whole chunks of the uncached rest before its last chunk: the worker runs them, one per turn
            job.prefill_to = job.cached + ((n - job.cached - 1) // chunk) * chunk
            job.tap = _Tap(s)
            if job.beams is not None:     # beam search (runtime_py/beam_sessions.py): one step of K forwards a turn
                from .beam_sessions import beam_generate
                while len(g.spare) < job.beams.width - 1:
                    g.spare.append(g.model.session(self.ctx))
                job.spares = [g.spare.pop() for _ in range(job.beams.width - 1)]
                job.gen = beam_generate([s] + job.spares, info.tokenizer, job.prompt_ids, job.beams,
                                        max_tokens=job.max_tokens, eog_ids=info.tokenizer.eog_ids,
                                        logprobs=job.logprobs, should_stop=job.cancelled.is_set)
                return
            job.gen = generate(job.tap, info.tokenizer, job.prompt_ids, job.params, max_tokens=job.max_tokens,
                               logprobs=max(job.logprobs, 1) if job.logprobs >= 0 else 0,
                               eog_ids=info.tokenizer.eog_ids, should_stop=job.cancelled.is_set,
                               speculate=_drafter(self.speculate))
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)

    def _step(self, job: Job):
        from .generate import Done
        if job not in self._active:
            return
        if job.cancelled.is_set():
            return self._finish(job)
        try:
            if job.prefilled < job.prefill_to:                # one prefill chunk per turn
                s = job.session
                c = job.prompt_ids[job.prefilled:job.prefilled + s.chunk]
                s.forward(c)
                job.prefilled += len(c)
                return
            ev = next(job.gen)
        except StopIteration:
            return self._finish(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(job, e)
        if isinstance(ev, Done):
            ev.timings["cached_tokens"] = job.cached        # generate() saw the worker's own prefill as cached
            return self._finish(job, ("done", ev))
        lp = None
        if job.logprobs >= 0 and ev.id >= 0 and job.tap.last is not None:
            tok = self._info[job.model_id]().tokenizer
            x = job.tap.last.astype(np.float64)
            m = x.max()
            lse = m + np.log(np.exp(x - m).sum())
            top = [(tok.decode([i]), lpv) for i, lpv in (ev.top_logprobs or [])[:job.logprobs]]
            lp = (tok.decode([ev.id]), float(x[ev.id] - lse), top)
        job.post(("token", ev.id, ev.text, lp))
