"""Stage 4 — the op schedule: which kernel runs when, on which buffers, with which uniforms and dispatch sizes.

A *program* is a flat list of steps the runtimes replay verbatim: no model logic lives in runtime_py/ or web/.
Three programs per model: `prefill` (T <= prefill_chunk tokens, mat-mat kernels), `decode` (T = 1, mat-vec kernels)
and `score` (prefill whose LM head writes the logits of every token, T <= limits.score_chunk, into `logits_all`: what
perplexity needs; see runtime_py/quality.py).

Steps and programs are compiler/ir.py's `Step` / `Program`. The weights come from the plan (stage 3): the builder calls
`plan(name)` for a tensor's WeightRef and binds its parts ("tensor#part"); activations are the buffers of
`activation_buffers`, each listed in the manifest with the programs that bind it (`logits_all`: score only), so a
runtime allocates a buffer only when it first runs a program that needs it.
"""
from __future__ import annotations

from .config import ModelConfig
from .errors import UnsupportedModelError
from .ir import Program, dispatch_size  # noqa: F401  (dispatch_size: runtimes import it from here)
from .kernels import (AddBias, Argmax, Attention, AttentionSoftcap, Embed, Matmul, MatmulCPU, MatmulTokens, MatvecCPU,
                      RMSNorm, RopeKV, Softcap)

PREFILL_TILE = 8     # tokens per matmul workgroup in prefill
# mat-vec workgroup shape (output rows x lanes splitting K); measured on lavapipe, where 16x4 beat 8x8 / 32x2 / 64x1
# for decode by 1.5-3x (see ARCHITECTURE.md, "tuning")
MATMUL_SHAPE = dict(rows=16, lanes=4)
# adapter classes with their own variant of a program, stored as programs["<name>@<class>"]; a runtime runs that one
# when its adapter is of the class (runtime_py/device.py adapter_class, web/device.js adapterClass), else "<name>".
# "cpu" (lavapipe, SwiftShader): the decode mat-vecs read x from a uniform binding (matvec_cpu.wgsl.j2), the prefill
# and score mat-mats reuse each x group for 8 rows per invocation (matmul_cpu.wgsl.j2)
ADAPTER_VARIANTS = {"cpu": ("prefill", "decode", "score")}
UNIFORM_X_MAX_K = 16384   # matvec_cpu binds x (K f32) as a uniform: K * 4 <= 64 KiB, WebGPU's default binding limit
SCORE_BYTES = 16 << 20   # the score program's (score_chunk, vocab) f32 logits buffer stays under this


def score_chunk(vocab: int, prefill_chunk: int) -> int:
    """Tokens per `score` pass: at most 64 and the prefill chunk, logits_all <= SCORE_BYTES (Gemma 3: 16 tokens)."""
    fit = SCORE_BYTES // (4 * vocab) // PREFILL_TILE * PREFILL_TILE
    return max(1, min(64, prefill_chunk, fit or 1))


class Builder:
    """Emits one program for one phase. `tile` = tokens per matmul workgroup (1 for decode).
    weights: the plan, a callable name -> WeightRef (compiler/plan.py)."""

    def __init__(self, cfg: ModelConfig, weights, tile: int, score: bool = False, adapter: str = "gpu"):
        self.cfg, self.W, self.tile, self.score, self.adapter = cfg, weights, tile, score, adapter
        self.p = Program()

    # -- helpers: one per kernel family ------------------------------------------------------------------------
    def matmul(self, x: str, w: str, y: str, *, n_offset=0, n_stride=None, residual=False, gate=None,
               up: str | None = None, last_only=False):
        wr = self.W(w)
        ur = self.W(up) if up else None
        tile = 1 if last_only else self.tile
        # prefill / score on a CPU adapter; not the last-token LM head: with one token in all 8 lanes matmul_cpu does
        # 8x the loads of a mat-vec (9.2 s vs 0.93 s on lavapipe, busy), so that step keeps the k-split Matmul
        cpu_mm = self.adapter == "cpu" and self.tile > 1 and not last_only
        for i, (row0, rows) in enumerate(wr.parts):
            if cpu_mm:   # 3-4x matmul_tt per dispatch on lavapipe (ARCHITECTURE.md)
                k = MatmulCPU(quant=wr.quant, gate=gate, residual=residual)
            elif tile > 1:   # prefill: one invocation per (row, token); 2x the k-split tile kernel on lavapipe
                k = MatmulTokens(quant=wr.quant, tokens=tile, gate=gate, residual=residual)
            elif self.adapter == "cpu" and self.tile == 1 and wr.k <= UNIFORM_X_MAX_K:   # decode (x row 0 = token 0):
                # 3-5x Matmul on lavapipe (ARCHITECTURE.md)
                k = MatvecCPU(quant=wr.quant, xk=wr.k, gate=gate, residual=residual)
            else:
                k = Matmul(quant=wr.quant, gate=gate, residual=residual, **MATMUL_SHAPE)
            if ur and ur.quant != wr.quant:
                raise UnsupportedModelError(f"{w} and {up} have different types ({wr.quant}, {ur.quant})")
            bind = [x, wr.ref(i)] + ([ur.ref(i)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset + row0, n_stride=n_stride or wr.rows)
            if "last_only" in dict(k.params):   # Matmul and the CPU-adapter kernels; MatmulTokens has none
                params["last_only"] = int(last_only)
            self.p.add(k, bind, params, [-(-rows // k.rows), 1 if last_only else f"T/{tile}", 1])

    def rmsnorm(self, x: str, weight: str, out: str | None, *, width: int, heads=1, stride=None, offset=0):
        k = RMSNorm(inplace=out is None)
        bind = [x, self.W(weight).ref(0)] + ([out] if out else [])
        self.p.add(k, bind, dict(width=width, heads=heads, stride=stride or width, offset=offset,
                                 eps=self.cfg.rms_eps), [heads, "T", 1])

    # -- the model --------------------------------------------------------------------------------------------
    def embed(self):
        c, wr = self.cfg, self.W("token_embd.weight")
        for i, (row0, rows) in enumerate(wr.parts):
            self.p.add(Embed(quant=wr.quant), ["tokens", wr.ref(i), "x"],
                       dict(k=c.n_embd, rows=rows, row0=row0, scale=c.embed_scale), ["T", 1, 1])

    def attention_block(self, L: int):
        c = self.cfg
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        qkv_dim = q_dim + 2 * kv_dim
        blk = f"blk.{L}."
        self.rmsnorm("x", blk + "attn_norm.weight", "xn", width=c.n_embd)
        if c.fused_qkv:   # phi3: attn_qkv's rows are [q | k | v], the qkv buffer's layout
            self.matmul("xn", blk + "attn_qkv.weight", "qkv", n_offset=0, n_stride=qkv_dim)
        else:
            self.matmul("xn", blk + "attn_q.weight", "qkv", n_offset=0, n_stride=qkv_dim)
            self.matmul("xn", blk + "attn_k.weight", "qkv", n_offset=q_dim, n_stride=qkv_dim)
            self.matmul("xn", blk + "attn_v.weight", "qkv", n_offset=q_dim + kv_dim, n_stride=qkv_dim)
        if c.qkv_bias:    # qwen2
            for name, off, n in (("attn_q", 0, q_dim), ("attn_k", q_dim, kv_dim), ("attn_v", q_dim + kv_dim, kv_dim)):
                self.add_bias(blk + name + ".bias", "qkv", n=n, offset=off, stride=qkv_dim)
        if c.qk_norm:
            self.rmsnorm("qkv", blk + "attn_q_norm.weight", None, width=c.head_dim, heads=c.n_head, stride=qkv_dim)
            self.rmsnorm("qkv", blk + "attn_k_norm.weight", None, width=c.head_dim, heads=c.n_kv_head,
                         stride=qkv_dim, offset=q_dim)
        swa = bool(c.swa_layers) and c.swa_layers[L]
        self.p.add(RopeKV(style=c.rope_style),
                   ["qkv", self.W("rope_inv_freq_local" if swa and c.rope_base_local else "rope_inv_freq").ref(0),
                    f"k_cache.{L}", f"v_cache.{L}"],
                   dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim, rot_dim=c.rope_dim), ["T", 1, 1])
        params = dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim,
                      window=c.sliding_window if swa else 0, scale=c.softmax_scale)
        if c.attn_softcap:   # gemma2
            att, params["cap"] = AttentionSoftcap(dims_per_thread=-(-c.head_dim // Attention.wg)), c.attn_softcap
        else:
            att = Attention(dims_per_thread=-(-c.head_dim // Attention.wg))
        self.p.add(att, ["qkv", f"k_cache.{L}", f"v_cache.{L}", "attn"], params, [c.n_head, "T", 1])
        if c.post_norms:
            self.matmul("attn", blk + "attn_output.weight", "xn")
            self.rmsnorm_add("xn", blk + "post_attention_norm.weight", "x")
        else:
            self.matmul("attn", blk + "attn_output.weight", "x", residual=True)

    def ffn_block(self, L: int):
        c = self.cfg
        blk = f"blk.{L}."
        self.rmsnorm("x", blk + "ffn_norm.weight", "xn", width=c.n_embd)
        if c.fused_gate_up:   # phi3: ffn_up = [gate | up], sliced by the plan (compiler/plan.py split_weights)
            self.matmul("xn", blk + "ffn_up.weight:gate", "ff", gate=c.act, up=blk + "ffn_up.weight:up")
        else:
            self.matmul("xn", blk + "ffn_gate.weight", "ff", gate=c.act, up=blk + "ffn_up.weight")
        if c.post_norms:
            self.matmul("ff", blk + "ffn_down.weight", "xn")
            self.rmsnorm_add("xn", blk + "post_ffw_norm.weight", "x")
        else:
            self.matmul("ff", blk + "ffn_down.weight", "x", residual=True)

    def add_bias(self, bias: str, y: str, *, n: int, offset: int, stride: int):
        """y[t, offset:offset + n] += bias, every token."""
        self.p.add(AddBias(), [self.W(bias).ref(0), y], dict(n=n, offset=offset, stride=stride),
                   [-(-n // AddBias.wg), "T", 1])

    def softcap(self, y: str, n: int, per_token: bool):
        """y = cap * tanh(y / cap) over (rows, n): gemma2's final logits."""
        k = Softcap(per_token=per_token)
        self.p.add(k, [y], dict(n=n, cap=self.cfg.final_softcap), [-(-n // k.wg), "T" if per_token else 1, 1])

    def rmsnorm_add(self, x: str, weight: str, out: str):
        """out += rmsnorm(x) * weight: gemma's post-attention / post-FFN norm, added to the residual stream."""
        c = self.cfg
        self.p.add(RMSNorm(residual=True), [x, self.W(weight).ref(0), out],
                   dict(width=c.n_embd, heads=1, stride=c.n_embd, offset=0, eps=c.rms_eps), [1, "T", 1])

    def head(self):
        c = self.cfg
        self.rmsnorm("x", "output_norm.weight", "xn", width=c.n_embd)
        out = "token_embd.weight" if c.tied_output else "output.weight"
        if self.score:   # every token's logits, no sampling
            self.matmul("xn", out, "logits_all", n_stride=c.vocab)
            if c.final_softcap:
                self.softcap("logits_all", c.vocab, per_token=True)
            return
        self.matmul("xn", out, "logits", last_only=True, n_stride=c.vocab)
        if c.final_softcap:
            self.softcap("logits", c.vocab, per_token=False)
        self.p.add(Argmax(), ["logits", "tokens"], dict(n=c.vocab), [1, 1, 1])

    def build(self) -> Program:
        self.embed()
        for L in range(self.cfg.n_layer):
            self.attention_block(L)
            self.ffn_block(L)
        self.head()
        return self.p


PROGRAMS = ("prefill", "decode", "score")
GENERATE = ("prefill", "decode")   # what a generating session runs; `score` only runs where perplexity is measured


def activation_buffers(cfg: ModelConfig, score_tokens: int | None = None) -> dict:
    """Activation and KV buffers: {name: {shape, dtype, programs}}. Shapes use the symbols T (prefill chunk) and ctx
    (context, chosen at load); `programs` lists the programs that bind the buffer, so a runtime allocates a buffer
    when it first runs one of them (the pipeline checks the list against the programs: `buffer_programs`).
    score_tokens: the score program's chunk (adds `logits_all`)."""
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    every, gen = list(PROGRAMS), list(GENERATE)
    bufs = {
        "tokens": {"shape": ["T"], "dtype": "u32", "programs": every},                    # (T,) ids; argmax writes [0]
        "x": {"shape": ["T", cfg.n_embd], "dtype": "f32", "programs": every},             # (T, D) residual stream
        "xn": {"shape": ["T", cfg.n_embd], "dtype": "f32", "programs": every},            # (T, D) normed / scratch
        "qkv": {"shape": ["T", q_dim + 2 * kv_dim], "dtype": "f32", "programs": every},   # (T, (n_head + 2 n_kv) hd)
        "attn": {"shape": ["T", q_dim], "dtype": "f32", "programs": every},               # (T, n_head hd)
        "ff": {"shape": ["T", cfg.n_ff], "dtype": "f32", "programs": every},              # (T, n_ff)
        "logits": {"shape": [cfg.vocab], "dtype": "f32", "programs": gen},                # (vocab,) last token only
    }
    if score_tokens:   # (score_chunk, vocab): every token's logits, score only (12-16 MiB: not in generating sessions)
        bufs["logits_all"] = {"shape": [score_tokens, cfg.vocab], "dtype": "f32", "programs": ["score"]}
    for L in range(cfg.n_layer):
        bufs[f"k_cache.{L}"] = {"shape": ["ctx", cfg.n_kv_head, cfg.head_dim], "dtype": "f32", "programs": every}
        bufs[f"v_cache.{L}"] = {"shape": ["ctx", cfg.n_kv_head, cfg.head_dim], "dtype": "f32", "programs": every}
    return bufs


def buffer_programs(programs: dict[str, Program]) -> dict[str, list[str]]:
    """{activation buffer: [programs that bind it]}, in program order. An adapter variant (`decode@cpu`) counts as its
    program (`decode`): it binds the same buffers, and a session runs one or the other."""
    out: dict[str, list[str]] = {}
    for name, prog in programs.items():
        base = name.split("@")[0]
        for ref in dict.fromkeys(r for s in prog.steps for r in s.bind if "#" not in r):
            if base not in out.setdefault(ref, []):
                out[ref].append(base)
    return out


def build_programs(cfg: ModelConfig, weights) -> dict[str, Program]:
    """weights: the plan, callable name -> WeightRef. Keys: PROGRAMS, then each `<name>@<adapter class>` variant."""
    progs = {"prefill": Builder(cfg, weights, PREFILL_TILE).build(),
             "decode": Builder(cfg, weights, 1).build(),
             "score": Builder(cfg, weights, PREFILL_TILE, score=True).build()}
    for cls, names in ADAPTER_VARIANTS.items():
        for name in names:
            progs[f"{name}@{cls}"] = Builder(cfg, weights, 1 if name == "decode" else PREFILL_TILE,
                                             score=name == "score", adapter=cls).build()
    return progs
