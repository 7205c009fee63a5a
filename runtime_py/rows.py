"""Batched forwards over many sequences: the KV pool and the `rows` program (compiler/schedule_rows.py).

    pool = KVPool(model, slots=4, ctx=1024)
    s = pool.session(0)                  # a Session on slot 0: prefill / decode / sample as usual, KV in the pool
    ids, logits = pool.forward_rows([(0, s.pos, tok0), (1, pos1, tok1)], logits_of=[1])
    ids, _ = pool.forward_rows(decode_rows + prompt_rows, n_out=len(decode_rows))   # no head for prompt rows

One buffer per layer and cache holds every slot's K/V ((slots * stride) rows; slot s owns rows [s * stride,
s * stride + ctx), stride = ctx rounded up so that each slot starts at a storage-offset-aligned byte). A slot's
Session binds the pool at its offset, so the one-sequence programs run unchanged on it; `forward_rows` runs R rows
of any slots at any positions — the next token of every running sequence, or a prompt chunk's consecutive positions
beside them — in one forward: each weight is read once for all rows. It writes each row's K/V at its (slot, pos)
and returns the greedy next token (argmax on the GPU, 4 bytes a row) of the first n_out rows — the head runs on
those only — plus the logits of the rows asked for (a sampled or logprob-reporting request samples on the CPU).
The caller keeps each Session's `pos` / `held`.

Used by `kiln serve` (runtime_py/scheduler.py); not mirrored in web/: the browser runs one sequence per page.
"""
from __future__ import annotations

import numpy as np
import wgpu

from compiler.errors import ArtifactError, ContextOverflowError, ModelTooLargeError

from .model import DEFAULT_CTX, UNIFORM_ALIGN, Session


class KVPool:
    def __init__(self, model, slots: int, ctx: int | None = None):
        m, dev = model.manifest, model.device
        if "rows" not in m["programs"] or "rows_head" not in m["programs"]:
            raise ArtifactError("this artifact has no `rows` program (compiled by an older kiln); recompile the model")
        self.model, self.slots = model, slots
        self.ctx = min(ctx or DEFAULT_CTX, model.config["context_length"])
        self.max_rows = m["limits"]["rows"]
        align = dev.limits["min-storage-buffer-offset-alignment"]
        max_bind = min(dev.limits["max-storage-buffer-binding-size"], dev.limits["max-buffer-size"])
        # the per-position buffers the rows program binds: the K/V caches, (ctx, n_kv, hd) each for one sequence
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
        self.buffers, self._row_bytes = {}, {}
        for name, b in m["buffers"].items():
            if "rows" not in b["programs"] or b["shape"][0] != "ctx":
                continue
            row = 4 * int(np.prod(b["shape"][1:]))
            stride = self.ctx
            while stride * row % align:
                stride += 1
            self.stride = stride
            size = slots * stride * row
            if size > max_bind:
                raise ModelTooLargeError(f"a KV pool of {slots} slots x {self.ctx} tokens needs {size / 2**20:.1f} "
                                         f"MiB per layer but the adapter binds at most {max_bind / 2**20:.1f} MiB; "
                                         "use fewer slots or a smaller --ctx")
            self.buffers[name] = model.device.create_buffer(size=size, usage=usage, label=f"pool {name}")
            self._row_bytes[name] = row
        # the rows program's own session: its activations (sized for the prefill chunk >= max_rows), the whole pool
        self.runner = Session(model, self.ctx, kv={n: (buf, 0, buf.size) for n, buf in self.buffers.items()},
                              programs=("rows", "rows_head"))
        self._ids_read = dev.create_buffer(size=4 * self.max_rows,
                                           usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)

    def session(self, slot: int) -> Session:
        """A Session on slot `slot`: its K/V caches are the pool's, at the slot's rows."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.slots - 1}")
        kv = {n: (buf, slot * self.stride * self._row_bytes[n], self.ctx * self._row_bytes[n])
              for n, buf in self.buffers.items()}
        s = Session(self.model, self.ctx, kv=kv)
        s.slot = slot
        return s

    def forward_rows(self, rows: list[tuple[int, int, int]], n_out: int | None = None,
                     logits_of=()) -> tuple[list[int], dict]:
        """One forward over `rows` [(slot, pos, token)], at most max_rows: each token's K/V goes to (slot, pos) and it
        attends over its slot's positions 0..pos (rows of the same step included, in any order: every K/V is written
        before attention runs; a prompt chunk is rows at consecutive positions). The first `n_out` rows (default:
        all) get a next token: the head (`rows_head`) runs on them only. Returns (greedy next token of each of those
        rows, {row index: (vocab,) float32 logits} for the rows in `logits_of`, each < n_out)."""
        R, dev = len(rows), self.model.device
        D = R if n_out is None else n_out
        if not 1 <= R <= self.max_rows:
            raise ValueError(f"forward_rows: 1..{self.max_rows} rows, got {R}")
        if not 0 <= D <= R or any(not 0 <= i < D for i in logits_of):
            raise ValueError(f"forward_rows: n_out {D} and logits_of {list(logits_of)} must lie within the {R} rows")
        info = np.zeros((R, 4), np.uint32)
        for i, (slot, pos, _) in enumerate(rows):
            if not 0 <= slot < self.slots:
                raise ValueError(f"row {i}: slot {slot} is not in 0..{self.slots - 1}")
            if not 0 <= pos < self.ctx:
                raise ContextOverflowError(f"row {i}: position {pos} is past the context of {self.ctx}")
            info[i, :2] = slot * self.stride, pos
        r = self.runner
        dev.queue.write_buffer(r.buffers["tokens"], 0, np.array([t for _, _, t in rows], np.uint32).tobytes())
        dev.queue.write_buffer(r.buffers["rows"], 0, info.tobytes())
        # State record 0: the body over R rows; record 1: the head over the first D
        states = np.zeros((2, UNIFORM_ALIGN // 4), np.uint32)
        states[0, 0], states[1, 0] = R, D
        dev.queue.write_buffer(r.state, 0, states.tobytes())
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        r._encode(cp, "rows", R, 0)
        if D:
            r._encode(cp, "rows_head", D, 1)
        cp.end()
        if D:
            enc.copy_buffer_to_buffer(r.buffers["tokens"], 0, self._ids_read, 0, 4 * D)   # argmax_rows wrote them
        dev.queue.submit([enc.finish()])
        if not D:
            return [], {}
        self._ids_read.map_async("READ_NOSYNC", 0, 4 * D).sync_wait()   # as Session._read_ring: no extra submit
        try:
            ids = np.frombuffer(self._ids_read.read_mapped(0, 4 * D), np.uint32).tolist()
        finally:
            self._ids_read.unmap()
        vocab = self.model.config["vocab"]
        logits = {i: np.frombuffer(dev.queue.read_buffer(r.buffers["logits_rows"], 4 * vocab * i, 4 * vocab),
                                   np.float32).copy() for i in logits_of}
        return ids, logits
