"""Continuous batching (the `rows` program): one turn of the GPU worker (runtime_py/scheduler.py) over the batched
requests of one model — rows forwards over the paged KV pool (runtime_py/rows.py) — and each request's generator
resumed up to its next token.

A turn's rows: every running request's next token (its last sampled token, or its prompt's last token) first — the
head runs on those only (n_out) —, then the prompt tokens of requests still prefilling, in arrival order, under a
budget of `limits.rows` rows per forward; usually one forward a turn, more only when the decode rows alone exceed
it. Each row's greedy token comes back from the GPU; a request that samples, reports logprobs or follows a grammar
gets its row's logits and samples on the CPU. A request's sequence takes pages as its rows need them (from the
reservation it was admitted with: runtime_py/pages.py) and holds each token once its forward ran.
"""
from __future__ import annotations

from .jobs import Job


def step_rows(engine, g, jobs: list[Job]):
    """One turn of the batched jobs of one model (g: the scheduler's _GPUModel): rows forwards over every pending
    token and, within the row budget, prompt rows; then each job whose row ran resumes its generator."""
    live = []
    for job in jobs:
        if job.cancelled.is_set():
            engine._finish(job)          # its pages go back before this turn's forwards
        else:
            live.append(job)
    decode = [j for j in live if j.pending is not None and j.emitted < j.limit]
    ended = [j for j in live if j.pending is not None and j.emitted >= j.limit]   # resume without a row
    prompt = [j for j in live if j.pending is None]
    ran: list[Job] = []
    pool = g.pool
    while True:
        # pending rows first (the head runs on them only: n_out), then prompt rows; owner[i]: the row's job
        rows, owner, prow, powner = [], [], [], []
        for job in decode[:pool.max_rows]:
            rows.append((job.session, job.session.pos, job.pending))
            owner.append(job)
        decode = decode[pool.max_rows:]
        while prompt and len(rows) + len(prow) < pool.max_rows:   # prompt rows in arrival order, in the budget
            job = prompt[0]
            s, k = job.session, min(pool.max_rows - len(rows) - len(prow), job.prefill_to - job.prefilled)
            prow += [(s, job.prefilled + i, job.prompt_ids[job.prefilled + i]) for i in range(k)]
            powner += [job] * k
            if job.prefilled + k < job.prefill_to:
                break                  # the budget is spent: the rest of its prompt next turn
            prompt.pop(0)
            if len(rows) + len(prow) < pool.max_rows:   # its last prompt token runs in the same forward
                rows.append((s, job.prefill_to, job.prompt_ids[-1]))
                owner.append(job)
            else:
                job.pending = job.prompt_ids[-1]   # next turn
        if not rows and not prow:
            break
        want = [i for i, job in enumerate(owner) if job.needs_logits]
        try:
            g.forwards, g.rows = g.forwards + 1, g.rows + len(rows) + len(prow)
            ids, logits = pool.forward_rows(rows + prow, n_out=len(rows), logits_of=want)
        except Exception as e:  # noqa: BLE001 — the jobs of this forward fail, the worker goes on
            for job in dict.fromkeys(owner + powner):
                engine._fail(job, e)
            return
        for i, (job, (_, pos, tok)) in enumerate(zip(owner, rows)):   # its generator's next forward takes it
            job.tap.ready = (pos, tok, ids[i], logits.get(i))
            ran.append(job)
        for job, (_, _, tok) in zip(powner, prow):   # a prompt row: its K/V is in the sequence's page now
            job.session.append(tok)
            job.prefilled += 1
        if not decode:
            break
    for job in ran + ended:
        resume(engine, job)


def resume(engine, job: Job):
    """Run a batched job's generator to its next token (it takes the row the worker ran) or to its end."""
    if job not in engine._active:
        return
    try:
        while True:
            ev = next(job.gen)
            if engine._event(job, ev):
                return
            if ev.id >= 0:
                job.pending, job.emitted = ev.id, job.emitted + 1
                return
    except StopIteration:
        engine._finish(job)
    except Exception as e:  # noqa: BLE001
        engine._fail(job, e)
