"""The GPU worker behind `kiln serve`: one thread per router owns every model load and forward pass (`Engine`).

At most `slots` requests per model run at once; requests beyond wait, FIFO, in a bounded queue (`max_queue` per
model); `submit` raises Overloaded when slots + queue are full. A client that disconnects (or a stream that is
closed) marks its Job cancelled: the worker drops it before its next step and frees what it held at once.

Continuous batching (artifacts with the `rows` program, compiler/schedule_rows.py; runtime_py/batching.py): every
batched request's KV lives in one paged pool (runtime_py/rows.py `KVPool`, sized by `kv_memory`; pages from
runtime_py/pages.py), and each turn is one `rows` forward over every running request's next token plus the prompt
tokens of requests still prefilling. Requests join and leave between turns. Admission needs pages as well as a
slot: a request is admitted with a reservation for prompt + max_tokens (at most the context), its prompt's cached
full pages mapped (prefix reuse: `Job.cached`, reported as usage.prompt_tokens_details.cached_tokens), so an
admitted request never runs out of pages mid-stream; one whose reservation does not fit waits at the head of the
queue until running requests release theirs; one that could never fit in the pool is refused at submit (a 400,
`KVPoolTooSmallError`). A row's result does not depend on the other rows of its forward, and a request takes this
path whether it runs alone or beside others, so batching changes no id (tests/gpu/test_rows.py,
tests/gpu/test_rows_serving.py). generate() drives each request as before: the worker runs the row a request's
next `forward([token])` asks for before resuming its generator, and the request's `_Tap` (runtime_py/jobs.py) hands
the result over instead of running a forward of its own.

The one-sequence path (round-robin, one step per request per turn: a prefill chunk or `session.forward([tok])`)
remains for speculative decoding (`kiln serve --speculate`: a score pass per step over one sequence; no pool is
allocated then), for beam search (use_beam_search, runtime_py/beam_sessions.py: a session plus width - 1 spare
sessions) and for artifacts without a `rows` program (compiled by an older kiln; `/health` says `"batching":
false`). Those programs need a contiguous KV cache: they run on Sessions of their own, outside the pages — up to
`slots` of them per model, created on demand, each keeping the ids it holds after its request, and a new request
goes to the free one sharing the longest prefix with its prompt (runtime_py/kvcache.py `pick_slot`); beam searches'
spares are kept by the model for the next beam request.

Events go back to each request's event loop as tuples: ("token", id, text, logprob | None), ("done", Done),
("error", APIError).
"""
from __future__ import annotations

import threading
import traceback
from collections import deque
from pathlib import Path

import numpy as np

from compiler.errors import ContextOverflowError, KilnError

from .batching import step_rows
from .jobs import Job, Overloaded, _Tap
from .kvcache import pick_slot, reuse_prefix
from .schemas import APIError, to_api_error

__all__ = ["Engine", "Job", "Overloaded"]


# ------------------------------------------------------------------------------------------------------------------
# the GPU worker


def _drafter(spec: str | None):
    if spec is None:
        return None
    from .speculate import NgramDrafter
    return NgramDrafter()


class _GPUModel:
    """One loaded model: the paged KV pool of its batched requests (None: one sequence per forward), and the
    Sessions of its one-sequence requests — at most `slots`, created on demand, each keeping the ids it holds after
    its request (runtime_py/kvcache.py), so a later request with the same prefix prefills only the rest."""

    def __init__(self, model, slots: int, ctx: int | None, kv_memory=None, batching: bool = True):
        from .rows import KVPool
        self.model = model
        self.sessions: list = []          # one-sequence slots, busy or free
        self.free: list = []
        self.clock = 0                    # slot use counter: session.last_used, for LRU
        self.pool = KVPool(model, ctx, kv_memory, sequences=slots) \
            if batching and "rows" in model.manifest["programs"] else None
        self.forwards = self.rows = 0     # rows forwards run, and the rows they carried (/health)
        self.spare: list = []             # beam searches' extra sessions (not slots: they hold no reusable prefix)

    def new_session(self, ctx: int | None):
        return self.model.session(ctx)


class Engine:
    """Owns the GPU: one worker thread runs every model load and forward pass, round-robin over active jobs."""

    def __init__(self, infos: dict, artifacts: dict[str, Path], ctx: int | None, slots: int,
                 max_queue: int, kv_memory=None):
        self.artifacts, self.ctx, self.slots, self.max_queue = artifacts, ctx, slots, max_queue
        self.kv_memory = kv_memory                   # --kv-memory: the paged pool's size (runtime_py/pages.py)
        self._plans: dict[str, dict | None] = {}     # model id -> its pool's plan (no GPU), None: not batched
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
    def batched(self, job: Job) -> bool:
        """Whether `job` runs on the rows program (its KV in the pool's pages)."""
        return self.plan(job.model_id) is not None and job.beams is None

    def plan(self, model_id: str) -> dict | None:
        """The model's KV pool plan (runtime_py/rows.py pool_plan, from the manifest), None when it is not batched."""
        if model_id not in self._plans:
            from .rows import pool_plan
            m = self._info[model_id]().manifest
            batching = self.speculate is None and "rows" in m["programs"] and "kv_page" in m["limits"]
            self._plans[model_id] = pool_plan(m, self.ctx, self.kv_memory, self.slots) if batching else None
        return self._plans[model_id]

    def submit(self, job: Job):
        """Queue `job`; Overloaded when slots + queue are full, KVPoolTooSmallError when its prompt + max_tokens
        needs more pages than the whole pool holds."""
        if self.batched(job):
            from .pages import PageAllocator
            plan = self.plan(job.model_id)
            n = len(job.prompt_ids)
            tokens = min(n + (job.max_tokens if job.max_tokens is not None else plan["ctx"]), plan["ctx"])
            PageAllocator(plan["pages"], plan["page_tokens"]).need(max(tokens, n))   # raises when it never fits
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
        """Per model: `running` (= `active`) requests generating, `waiting` (= `queued`) for a slot or for pages;
        whether requests are batched (`batching`), the rows forwards run so far with the rows they carried, and the
        paged KV pool (`kv`: runtime_py/pages.py PageAllocator.stats + its bytes; null until the model loads); the
        one-sequence path's slots: `slots` allowed, `sessions` allocated, `slots_busy`, `cached_tokens` each holds."""
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
                          "batching": bool(g and g.pool),
                          "rows_forwards": g.forwards if g else 0, "rows_run": g.rows if g else 0,
                          "kv": g.pool.stats() if g and g.pool else None,
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
        later: dict[str, list[Job]] = {}   # per model: a job that must wait for pages and every start after it
        for job in starts:
            if job.model_id in later or not self._start(job):
                later.setdefault(job.model_id, []).append(job)
        if later:
            with self._cv:
                for mid, jobs in later.items():
                    for job in jobs:
                        self._active.remove(job)
                    self._waiting[mid].extendleft(reversed(jobs))   # back at the head of the queue, in order
        batched: dict[str, list[Job]] = {}
        for job in list(self._active):
            if job.rows:
                batched.setdefault(job.model_id, []).append(job)
            else:
                self._step(job)
        for mid, jobs in batched.items():
            step_rows(self, self._gpu[mid], jobs)
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
            g = self._gpu[job.model_id]
            if job.rows:
                g.pool.release(job.session)    # its pages: back at once (full ones stay cached for reuse)
            else:
                g.free.append(job.session)
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

    def _start(self, job: Job) -> bool:
        """Give `job` its KV (a paged sequence, or a Session of its own) and its generator; False: it must wait for
        pages (nothing was taken; the caller puts it back at the head of the queue)."""
        from .generate import generate
        if job.cancelled.is_set():
            self._finish(job)
            return True
        try:
            g = self._gpu.get(job.model_id)
            if g is None:
                from .model import Model
                g = self._gpu[job.model_id] = _GPUModel(Model(self.artifacts[job.model_id]), self.slots, self.ctx,
                                                        self.kv_memory, batching=self.speculate is None)
            info = self._info[job.model_id]()
            n = len(job.prompt_ids)
            job.rows = g.pool is not None and job.beams is None
            if job.rows:   # the worker runs every prompt row but the last; the last is the first pending row
                ctx = g.pool.ctx
                if not 0 < n < ctx:   # generate()'s own checks, before any row runs
                    raise ContextOverflowError(f"prompt is {n} tokens but the context holds {ctx} "
                                               f"(use a shorter prompt or a larger --ctx)" if n else
                                               "empty prompt: nothing to condition on")
                p, room = job.params, ctx - n
                want = job.max_tokens if job.max_tokens is not None else p.max_tokens
                job.limit = room if want is None else min(want, room)
                seq = g.pool.sequence(job.prompt_ids, max_new=job.limit)   # its cached prefix pages mapped
                if seq is None:
                    return False
                job.session = seq
                job.tap = _Tap(seq, rows=True)
                job.cached = job.prefilled = reuse_prefix(job.tap, job.prompt_ids)   # = the mapped pages' tokens
                job.prefill_to = n - 1
                job.needs_logits = not (p.greedy and job.logprobs < 0 and p.repeat_penalty == 1
                                        and not p.presence_penalty and not p.frequency_penalty
                                        and p.response_format is None and p.grammar is None and p.regex is None)
            else:
                s = pick_slot(g.free, job.prompt_ids, can_grow=len(g.sessions) < self.slots)
                if s is None:
                    s = g.new_session(self.ctx)
                    g.sessions.append(s)
                else:
                    g.free.remove(s)
                g.clock += 1
                s.last_used = g.clock
                job.session = s
                job.tap = _Tap(s)
                job.cached = job.prefilled = reuse_prefix(job.tap, job.prompt_ids)
                # whole chunks of the uncached rest before its last chunk: the worker runs them, one per turn
                job.prefill_to = job.cached + ((n - job.cached - 1) // s.chunk) * s.chunk
            if job.beams is not None:     # beam search (runtime_py/beam_sessions.py): one step of K forwards a turn
                from .beam_sessions import beam_generate
                while len(g.spare) < job.beams.width - 1:
                    g.spare.append(g.model.session(self.ctx))
                job.spares = [g.spare.pop() for _ in range(job.beams.width - 1)]
                job.gen = beam_generate([job.session] + job.spares, info.tokenizer, job.prompt_ids, job.beams,
                                        max_tokens=job.max_tokens, eog_ids=info.tokenizer.eog_ids,
                                        logprobs=job.logprobs, should_stop=job.cancelled.is_set)
                return True
            job.gen = generate(job.tap, info.tokenizer, job.prompt_ids, job.params, max_tokens=job.max_tokens,
                               logprobs=max(job.logprobs, 1) if job.logprobs >= 0 else 0,
                               eog_ids=info.tokenizer.eog_ids, should_stop=job.cancelled.is_set,
                               speculate=_drafter(self.speculate))
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)
        return True

    def _step(self, job: Job):
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
        self._event(job, ev)

    def _event(self, job: Job, ev) -> bool:
        """Post one generator event; True when the job is finished."""
        from .generate import Done
        if isinstance(ev, Done):
            ev.timings["cached_tokens"] = job.cached        # generate() saw the worker's own prefill as cached
            self._finish(job, ("done", ev))
            return True
        lp = None
        if job.logprobs >= 0 and ev.id >= 0 and job.tap.last is not None:
            tok = self._info[job.model_id]().tokenizer
            x = job.tap.last.astype(np.float64)
            m = x.max()
            lse = m + np.log(np.exp(x - m).sum())
            top = [(tok.decode([i]), lpv) for i, lpv in (ev.top_logprobs or [])[:job.logprobs]]
            lp = (tok.decode([ev.id]), float(x[ev.id] - lse), top)
        job.post(("token", ev.id, ev.text, lp))
        return False

