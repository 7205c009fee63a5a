"""Stage 4, continued — the `rows` program: one forward over R rows, each row its own (KV slot, position, token).

A decode step for 12 sequences is 12 rows of 12 slots; a prompt chunk is rows of one slot at consecutive positions;
a step may mix both. What `kiln serve` batches with (runtime_py/rows.py `KVPool`, runtime_py/scheduler.py).

It is the prefill program with three steps made row-indexed (compiler/kernels_rows.py): the embedding, the norms and
the matmuls treat the R rows like a prompt's tokens — so each weight is read once per forward for all rows (the
mat-mat kernels, on CPU adapters one step per 8-row x window: `Builder.matmul`) — while RoPE + the KV write
(`rope_kv_rows`) and attention (`attention_rows`) take each row's position and page table from the row-info buffer
`rows` ((T, 4) u32: [table0, pos, -, -]). The K/V buffers are then the paged KV *pool*: pages of KV_PAGE positions,
(pages * KV_PAGE) rows per layer, and a sequence's position j lives in row page_table[table0 + j // KV_PAGE] *
KV_PAGE + j % KV_PAGE (runtime_py/pages.py allocates, shares and evicts the pages). The head is a
program of its own, `rows_head`, replayed in the same pass over the first D rows only (the rows that want a next
token: a prompt's rows before its last only write K/V, and pay no LM head): it writes those rows' logits
(`logits_rows`, (rows, vocab)) and `argmax_rows` each one's greedy token into tokens[t]; a sampled row's logits are
read back and sampled on the CPU.

Every kernel computes a row from that row alone (no reduction across rows, the same code path for every row of a
window), so a row's logits do not depend on which other rows share its step: batching changes no id.
"""
from __future__ import annotations

from .config import ModelConfig
from .errors import UnsupportedModelError
from .ir import Program, split_ref
from .kernels import RopeKV
from .kernels_cpu import MatmulCPU
from .kernels_rows import ROW_INFO_WORDS, ArgmaxRows, AttentionRows, AttentionRowsSoftcap, RopeKVRows
from .schedule import PREFILL_TILE, SCORE_BYTES, Builder, cpu_window

ROWS_MAX = 32   # most rows per `rows` forward (and the logits_rows buffer's rows), at most the prefill chunk
# the body and the head, each with its CPU-adapter variant (schedule.py ADAPTER_VARIANTS)
ROW_PROGRAMS = ("rows", "rows_head", "rows@cpu", "rows_head@cpu")


def rows_limit(vocab: int, prefill_chunk: int) -> int:
    """Rows per `rows` forward: ROWS_MAX, at most the prefill chunk (the activations are sized for it) and with
    logits_rows <= SCORE_BYTES (Gemma 3's 262k vocabulary: 16 rows); a multiple of PREFILL_TILE."""
    fit = SCORE_BYTES // (4 * vocab) // PREFILL_TILE * PREFILL_TILE
    return max(PREFILL_TILE, min(ROWS_MAX, prefill_chunk, fit))


class _RowsProgram(Program):
    """A Program whose RoPE + KV-write steps become their row-indexed variant (the row-info buffer bound third):
    Builder.attention_block adds that step itself, between the QKV projections (and QK-norm) and attention."""

    def add(self, kernel, bind, params, dispatch):
        if isinstance(kernel, RopeKV):
            kernel, bind = RopeKVRows(style=kernel.style), [*bind[:2], "rows", "page_table", *bind[2:]]
        super().add(kernel, bind, params, dispatch)


class RowsBuilder(Builder):
    """The `rows` program: Builder's prefill (tile PREFILL_TILE, `rows` rows at most) with row-indexed attention, and
    `rows_head`: a head over every row it is run on."""

    def __init__(self, cfg: ModelConfig, weights, rows: int, adapter: str = "gpu"):
        super().__init__(cfg, weights, PREFILL_TILE, adapter=adapter, chunk=rows)
        self.p = _RowsProgram()

    def matmul_cpu_windows(self, x: str, wr, ur, part: int, y: str, *, n_offset, n_stride, rows, residual, gate,
                           last_only):
        """Builder's CPU-adapter matmul (one step per x window) with a kernel per window size: the window that holds
        the last row runs the smallest matmul_cpu covering its rows (8, 4, 2 or 1 of them: "T>a" / "T<=b" pick one),
        so a step of 1-3 rows does not pay for 8 (a row's arithmetic is the same in every size: tests/gpu/test_rows.py
        compares a row alone, in 4 and across windows bit for bit)."""
        assert not last_only, "the rows head runs on every row it is given"
        tokens = cpu_window(wr.k)
        sizes = [tokens >> i for i in range(tokens.bit_length()) if tokens >> i]   # e.g. 8, 4, 2, 1
        for t0 in range(0, self.chunk, tokens):
            xw = f"{x}+{t0 * wr.k * 4}" if t0 else x
            bind = [xw, wr.ref(part)] + ([ur.ref(part)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset, n_stride=n_stride, last_only=0, t0=t0)
            for size in sizes:   # this window has more than size / 2 rows and at most size (the largest: > half)
                k = MatmulCPU(quant=wr.quant, xk=wr.k, tokens=size, gate=gate, residual=residual)
                lo = f"T>{t0 + size // 2}" if size > 1 else f"T>{t0}"
                hi = 1 if size == tokens else f"T<={t0 + size}"
                self.p.add(k, bind, params, [-(-rows // k.rows_per_wg), lo, hi])

    def attention(self, L: int, window: int, rope=None):
        """Each row over its own slot's keys (attention_rows: one workgroup per (KV head, row), one split)."""
        c = self.cfg
        if c.head_dim % 4 or c.n_head % c.n_kv_head:
            raise UnsupportedModelError(f"attention needs head_dim % 4 == 0 and n_head % n_kv_head == 0 "
                                        f"(head_dim {c.head_dim}, {c.n_head} heads, {c.n_kv_head} KV heads)")
        assert rope is None, "the rows program keeps RoPE as its own step"
        params = dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim, window=window, scale=c.softmax_scale)
        kind = AttentionRows
        if c.attn_softcap:   # gemma2
            kind, params["cap"] = AttentionRowsSoftcap, c.attn_softcap
        self.p.add(kind.for_heads(c.n_head, c.n_kv_head, c.head_dim),
                   ["qkv", "rows", "page_table", f"k_cache.{L}", f"v_cache.{L}", "attn"], params,
                   [c.n_kv_head, 1, "T"])

    def head(self):
        """Every row's logits, then each row's greedy token into tokens[t]."""
        c = self.cfg
        self.rmsnorm("x", "output_norm.weight", "xn", width=c.n_embd)
        self.matmul("xn", "token_embd.weight" if c.tied_output else "output.weight", "logits_rows", n_stride=c.vocab)
        if c.final_softcap:
            self.softcap("logits_rows", c.vocab, per_token=True)
        self.p.add(ArgmaxRows(), ["logits_rows", "tokens"], dict(n=c.vocab), ["T", 1, 1])


    def build(self) -> Program:
        """The body: embedding and every layer (the K/V of every row written); the head is `rows_head`."""
        self.embed()
        for L in range(self.cfg.n_layer):
            self.attention_block(L)
            self.ffn_block(L)
        return self.p

    def build_head(self) -> Program:
        self.head()
        return self.p


def build_rows_programs(cfg: ModelConfig, weights, prefill_chunk: int) -> dict[str, Program]:
    """{"rows", "rows_head", "rows@cpu", "rows_head@cpu"}: the body over R rows and the head over the first D <= R
    (the rows that want a next token; prompt rows before a prompt's last only write their K/V), run in one pass with
    T = R, then T = D; the GPU kernels, and the CPU-adapter matmuls (matmul_cpu windows)."""
    rows = rows_limit(cfg.vocab, prefill_chunk)
    out = {}
    for name in ROW_PROGRAMS:
        base, _, adapter = name.partition("@")
        b = RowsBuilder(cfg, weights, rows, adapter=adapter or "gpu")
        out[name] = b.build() if base == "rows" else b.build_head()
    return out


def add_rows_buffers(bufs: dict, cfg: ModelConfig, programs: dict[str, Program], rows: int) -> dict:
    """activation_buffers' dict with the rows programs added: "rows" / "rows_head" in the `programs` of every buffer
    they bind (the shared activations, sized for the prefill chunk T >= rows; the K/V buffers, which a runtime sizes
    for the pool), plus their own: the row info (T, 4), the page tables (sized by a runtime too) and logits_rows
    (rows, vocab)."""
    bufs["rows"] = {"shape": ["T", ROW_INFO_WORDS], "dtype": "u32", "programs": []}          # [table0, pos]
    # the page tables of a forward's sequences: a runtime sizes it for its pool, as the K/V buffers —
    # (rows, ceil(ctx / KV_PAGE)) u32 (runtime_py/rows.py); the declared (ctx,) is never the largest buffer
    bufs["page_table"] = {"shape": ["ctx"], "dtype": "u32", "programs": []}
    bufs["logits_rows"] = {"shape": [rows, cfg.vocab], "dtype": "f32", "programs": []}      # (rows, vocab)
    for prog in ("rows", "rows_head"):
        bound = dict.fromkeys(split_ref(r)[0] for name in (prog, prog + "@cpu") for s in programs[name].steps
                              for r in s.bind if "#" not in r)
        for name in bound:   # a new list: activation_buffers shares one list between buffers
            if prog not in bufs[name]["programs"]:
                bufs[name]["programs"] = [*bufs[name]["programs"], prog]
    return bufs
