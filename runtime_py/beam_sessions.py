"""Beam search on the GPU: K Sessions of one model are the logits source of runtime_py/beam.py.

    sessions = [session] + [model.session(ctx) for _ in range(K - 1)]
    for ev in beam_generate(sessions, tok, prompt_ids, BeamSpec(K, K, 1.0), max_tokens=8, eog_ids=tok.eog_ids): ...
    # ev: Token(-1, "") after each beam step (the server interleaves requests per step), then one BeamDone

Beam i lives in sessions[slot[i]]. A step's moves (parent, token) keep each parent's first child in the parent's own
session; every other child takes a session whose beam has no child, after a copy of the parent's KV rows 0..pos
(every buffer whose leading dimension is ctx: k_cache.L / v_cache.L, (ctx, n_kv_head, head_dim) f32, or on a CPU
adapter the @cpu programs' textures k_tex.L / v_tex.L: copy_texture_to_texture, runtime_py/kv_texture.py) in one command
encoder, queued before the forwards. So there are always K sessions (no allocation per step), and a copy never reads a
session that the same step overwrites. Then each live beam runs one decode forward of its new token and its logits are
read back (vocab x 4 bytes per beam): K forward passes + K logits reads per step. The kernels take one sequence, so
beams are not batched (runtime_py/scheduler.py has the same limit); a paged KV cache would make a fork copy at most one
page instead of pos rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import wgpu

from .beam import BeamSearch, BeamSpec, Hypothesis
from .generate import Done, Token
from .kv_texture import copy_kv_rows
from .kvcache import reuse_prefix


def kv_rows(manifest: dict) -> list[tuple[str, int]]:
    """(buffer, bytes per position) of every per-position buffer the forward programs keep a sequence in (leading
    dim ctx, bound by decode: the KV cache; not the GPU sampler's history, which beams do not use)."""
    out = []
    for name, b in manifest["buffers"].items():
        if b["shape"] and b["shape"][0] == "ctx" and "decode" in b.get("programs", ["decode"]):
            out.append((name, 4 * math.prod(b["shape"][1:])))
    return out


class SessionBeams:
    """The logits source: `start(prompt_ids)` -> [logits after the prompt]; `advance(moves)` -> logits per live beam."""

    def __init__(self, sessions: list, reuse: bool = True):
        self.sessions, self.reuse = sessions, reuse
        self.slot = [0]                               # live beam i -> its session
        self.kv = kv_rows(sessions[0].model.manifest)
        self.copies = self.forwards = 0
        self.cached = 0

    def start(self, prompt_ids: list[int]):
        s = self.sessions[0]
        if self.reuse:
            self.cached = reuse_prefix(s, prompt_ids)
        else:
            s.reset()
        s.forward(prompt_ids[self.cached:])
        return [s.logits()]

    def advance(self, moves: list[tuple[int, int]]):
        if len(moves) > len(self.sessions):
            raise ValueError(f"{len(moves)} beams for {len(self.sessions)} sessions")
        parents = {p for p, _ in moves}
        kept = {self.slot[p] for p in parents}
        free = [i for i in range(len(self.sessions)) if i not in kept]
        slot, claimed, copies = [], set(), []
        for p, _ in moves:
            src = self.slot[p]
            if src not in claimed:                    # the parent's first child stays where the parent is
                claimed.add(src)
                slot.append(src)
            else:
                dst = free.pop(0)
                copies.append((src, dst))
                slot.append(dst)
        if copies:
            self._copy(copies)
        self.slot = slot
        for (_, tok), i in zip(moves, slot):
            self.sessions[i].forward([tok])
        self.forwards += len(moves)
        return [self.sessions[i].logits() for i in slot]

    def _copy(self, pairs: list[tuple[int, int]]):
        """sessions[dst] := sessions[src] (KV rows 0..pos, pos, held ids) for each pair, in one submit."""
        s0 = self.sessions[0]
        dev = s0.model.device
        enc = dev.create_command_encoder()
        for src, dst in pairs:
            a, b = self.sessions[src], self.sessions[dst]
            for name, row in self.kv:
                if a.pos and a.kv_buffer(name):   # None: a buffer the sessions' programs do not bind
                    (sa, oa), (sb, ob) = a.kv_buffer(name), b.kv_buffer(name)   # a KV-pool slot: at its offset
                    if isinstance(sa, wgpu.GPUTexture):   # the @cpu programs' K/V (runtime_py/kv_texture.py)
                        copy_kv_rows(enc, sa, sb, a.pos)
                    else:
                        enc.copy_buffer_to_buffer(sa, oa, sb, ob, a.pos * row)
            b.pos, b.held = a.pos, list(a.held)
        dev.queue.submit([enc.finish()])
        self.copies += len(pairs)


@dataclass
class BeamDone(Done):
    """Done of the best hypothesis (ids, text, finish_reason), plus every returned one, best first."""
    beams: list[Hypothesis] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def beam_generate(sessions: list, tokenizer, prompt_ids: list[int], spec: BeamSpec, *, max_tokens: int,
                  eog_ids=(), logprobs: int = -1, reuse: bool = True, should_stop=lambda: False):
    """Yields Token(-1, "") after each step, then one BeamDone (nothing when should_stop() ends it early).
    sessions: spec.width sessions of one model, sessions[0] with the prompt's cached prefix (runtime_py/kvcache.py),
    the others any state (they are overwritten by forks) and at least as much context as the generation needs.
    max_tokens: already capped to the context."""
    if len(sessions) != spec.width:
        raise ValueError(f"beam_generate: {len(sessions)} sessions for {spec.width} beams")
    t0 = time.perf_counter()
    src = SessionBeams(sessions, reuse)
    search = BeamSearch(spec.width, max_tokens, eog_ids, spec.n, spec.length_penalty, logprobs)
    rows = src.start(prompt_ids)
    t_first = time.perf_counter()
    while moves := search.step(rows):
        rows = src.advance(moves)
        if should_stop():
            return
        yield Token(-1, "", None)
    t_end = time.perf_counter()
    hyps = search.result()
    texts = [tokenizer.decode(h.ids) for h in hyps]
    steps = search.t
    timings = {
        "prompt_tokens": len(prompt_ids), "cached_tokens": src.cached, "generated_tokens": len(hyps[0].ids),
        "ttft_s": round(t_first - t0, 4),
        "prefill_tok_s": round((len(prompt_ids) - src.cached) / max(t_first - t0, 1e-9), 2),
        "total_s": round(t_end - t0, 4),
        "beams": spec.width, "beam_steps": steps, "forwards": src.forwards, "kv_copies": src.copies,
        # a step after the first: one decode forward per live beam (+ the forks' copies) and the logits reads
        "ms_per_beam_step": round(1000 * (t_end - t_first) / (steps - 1), 1) if steps > 1 else None,
    }
    yield BeamDone(hyps[0].ids, texts[0], hyps[0].finish_reason, timings, beams=hyps, texts=texts)
