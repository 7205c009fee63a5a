"""Batched forwards over many sequences: the paged KV pool and the `rows` program (compiler/schedule_rows.py).

    pool = KVPool(model, ctx=1024, kv_memory="256")     # MiB, or "16384tokens"; default: runtime_py/pages.py kv_plan
    seq = pool.sequence(prompt_ids, max_new=16)          # a PagedSequence (cached prefix pages mapped) or None: wait
    ids, logits = pool.forward_rows([(seq, seq.pos, tok0), (seq2, pos2, tok2)], logits_of=[1])
    ids, _ = pool.forward_rows(decode_rows + prompt_rows, n_out=len(decode_rows))   # no head for prompt rows
    seq.append(tok0)                                     # the caller holds each token whose K/V a forward wrote
    pool.release(seq)

One buffer per layer and cache holds every page's K/V: (pages * page) rows of (n_kv, hd) f32, page p owning rows
[p * page, (p + 1) * page). The page allocator (runtime_py/pages.py) hands pages to sequences, shares full prefix
pages between them and evicts unreferenced cached pages least-recently-used. `forward_rows` runs R rows of any
sequences at any positions — the next token of every running sequence, or a prompt chunk's consecutive positions
beside them — in one forward: each weight is read once for all rows. It takes pages for each row's position, writes
the forward's page tables (`page_table`: each sequence's pages, from its table0 = the row info's first word), writes
each row's K/V at its position and returns the greedy next token (argmax on the GPU, 4 bytes a row) of the first
n_out rows — the head runs on those only — plus the logits of the rows asked for (a sampled or logprob-reporting
request samples on the CPU).

Only the `rows` programs read the pages. The one-sequence programs (prefill / decode / score / sample: speculative
decoding, beam search, artifacts without `rows`) need a contiguous KV cache and run on Sessions of their own, outside
the pool (runtime_py/scheduler.py).

Used by `kiln serve` (runtime_py/scheduler.py); not mirrored in web/: the browser runs one sequence per page.
"""
from __future__ import annotations

import numpy as np
import wgpu

from compiler.errors import ArtifactError, ContextOverflowError, ModelTooLargeError

from .model import DEFAULT_CTX, UNIFORM_ALIGN, Session
from .pages import PageAllocator, PagedSequence, kv_plan


def kv_bytes_per_token(manifest: dict) -> int:
    """K + V bytes of every layer for one position: the per-position buffers the rows program binds."""
    return sum(4 * int(np.prod(b["shape"][1:])) for name, b in manifest["buffers"].items() if _is_kv(name, b))


def _is_kv(name: str, b: dict) -> bool:
    """A per-position buffer of the rows program: a layer's K or V cache (the page tables are sized apart)."""
    return "rows" in b.get("programs", ()) and b["shape"][0] == "ctx" and name != "page_table"


def pool_plan(manifest: dict, ctx: int | None = None, kv_memory=None, sequences: int | None = None) -> dict:
    """The pool `KVPool` would allocate for this artifact (no GPU): runtime_py/pages.py kv_plan."""
    if "rows" not in manifest["programs"] or "kv_page" not in manifest["limits"]:
        raise ArtifactError("this artifact has no paged `rows` program (compiled by an older kiln); recompile the "
                            "model")
    ctx = min(ctx or DEFAULT_CTX, manifest["config"]["context_length"])
    kw = {} if sequences is None else {"sequences": sequences}
    return kv_plan(kv_bytes_per_token(manifest), manifest["limits"]["kv_page"], ctx, kv_memory, **kw)


class KVPool:
    def __init__(self, model, ctx: int | None = None, kv_memory=None, sequences: int | None = None):
        m, dev = model.manifest, model.device
        self.plan = pool_plan(m, ctx, kv_memory, sequences)
        self.model, self.ctx, self.page = model, self.plan["ctx"], self.plan["page_tokens"]
        self.max_rows = m["limits"]["rows"]
        self.alloc = PageAllocator(self.plan["pages"], self.page)
        max_bind = min(dev.limits["max-storage-buffer-binding-size"], dev.limits["max-buffer-size"])
        # the per-position buffers the rows program binds: the K/V caches, (pages * page, n_kv, hd) f32 each
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
        self.buffers = {}
        for name, b in m["buffers"].items():
            if not _is_kv(name, b):
                continue
            size = self.plan["tokens"] * 4 * int(np.prod(b["shape"][1:]))
            if size > max_bind:
                raise ModelTooLargeError(f"a KV pool of {self.plan['tokens']} tokens needs {size / 2**20:.1f} MiB "
                                         f"per layer but the adapter binds at most {max_bind / 2**20:.1f} MiB; use "
                                         "a smaller --kv-memory")
            self.buffers[name] = model.device.create_buffer(size=size, usage=usage, label=f"pool {name}")
        # a forward's page tables: each of its sequences' (at most max_rows of them, ceil(ctx / page) pages each)
        self.page_table = dev.create_buffer(size=4 * self.max_rows * -(-self.ctx // self.page),
                                            usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST,
                                            label="pool page_table")
        # the rows program's own session: its activations (sized for the prefill chunk >= max_rows), the whole pool
        kv = {n: (buf, 0, buf.size) for n, buf in [*self.buffers.items(), ("page_table", self.page_table)]}
        self.runner = Session(model, self.ctx, kv=kv, programs=("rows", "rows_head"))
        self._ids_read = dev.create_buffer(size=4 * self.max_rows,
                                           usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)

    def sequence(self, prompt_ids=(), max_new: int | None = None) -> PagedSequence | None:
        """A sequence for `prompt_ids` with pages reserved for it and `max_new` more tokens (default: to the end of
        the context), its prompt's cached prefix pages mapped (seq.held); None when that does not fit now (wait for
        pages); KVPoolTooSmallError when it never will."""
        n = len(prompt_ids)
        tokens = self.ctx if max_new is None else min(n + max_new, self.ctx)
        return self.alloc.admit(list(prompt_ids), max(tokens, n, 1), ctx=self.ctx)

    def release(self, seq: PagedSequence):
        self.alloc.release(seq)

    def stats(self) -> dict:
        return {**self.alloc.stats(), "bytes": self.plan["bytes"]}

    def forward_rows(self, rows: list[tuple[PagedSequence, int, int]], n_out: int | None = None,
                     logits_of=()) -> tuple[list[int], dict]:
        """One forward over `rows` [(sequence, pos, token)], at most max_rows: each token's K/V goes to position pos
        of its sequence (taking pages as needed; a position the sequence already holds is never written again:
        full pages are shared, append-only) and it attends over that sequence's positions 0..pos (rows of the same
        step included, in any order: every K/V is written before attention runs; a prompt chunk is rows at
        consecutive positions). The first `n_out` rows (default: all) get a next token: the head (`rows_head`) runs
        on them only. Returns (greedy next token of each of those rows, {row index: (vocab,) float32 logits} for
        the rows in `logits_of`, each < n_out)."""
        R, dev = len(rows), self.model.device
        D = R if n_out is None else n_out
        if not 1 <= R <= self.max_rows:
            raise ValueError(f"forward_rows: 1..{self.max_rows} rows, got {R}")
        if not 0 <= D <= R or any(not 0 <= i < D for i in logits_of):
            raise ValueError(f"forward_rows: n_out {D} and logits_of {list(logits_of)} must lie within the {R} rows")
        table0: dict[int, int] = {}     # id(sequence) -> its table's first entry in page_table
        seqs = []
        for i, (seq, pos, _) in enumerate(rows):
            if not isinstance(seq, PagedSequence) or seq.alloc is not self.alloc or seq.released:
                raise ValueError(f"row {i}: not a live sequence of this pool")
            if not 0 <= pos < self.ctx:
                raise ContextOverflowError(f"row {i}: position {pos} is past the context of {self.ctx}")
            if pos < seq.pos:
                raise ValueError(f"row {i}: position {pos} is already held by its sequence (K/V is append-only)")
            if id(seq) not in table0:
                table0[id(seq)] = -1
                seqs.append(seq)
        for seq in seqs:   # pages for every row's position, before any table is written
            self.alloc.grow(seq, max(pos for s, pos, _ in rows if s is seq) + 1)
        table, info = [], np.zeros((R, 4), np.uint32)
        for seq in seqs:
            table0[id(seq)] = len(table)
            table.extend(seq.pages)
        for i, (seq, pos, _) in enumerate(rows):
            info[i, :2] = table0[id(seq)], pos
        r = self.runner
        dev.queue.write_buffer(r.buffers["tokens"], 0, np.array([t for _, _, t in rows], np.uint32).tobytes())
        dev.queue.write_buffer(r.buffers["rows"], 0, info.tobytes())
        dev.queue.write_buffer(self.page_table, 0, np.array(table, np.uint32).tobytes())
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
