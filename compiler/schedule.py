"""Stage 4 — the op schedule: which kernel runs when, on which buffers, with which uniforms and dispatch sizes.

A *program* is a flat list of steps the runtimes replay verbatim: no model logic lives in runtime_py/ or web/.
Four programs per model: `prefill` (T <= prefill_chunk tokens, mat-mat kernels), `decode` (T = 1, mat-vec kernels),
`score` (prefill whose LM head writes the logits of every token, T <= limits.score_chunk, into `logits_all`: what
perplexity needs; see runtime_py/quality.py) and `sample` (GPU sampling of the next token from `logits`, replayed
after `decode` or the last prefill chunk; several decode + sample steps share one submit, see runtime_py/model.py).

Steps and programs are compiler/ir.py's `Step` / `Program`. The weights come from the plan (stage 3): the builder calls
`plan(name)` for a tensor's WeightRef and binds its parts ("tensor#part"); activations are the buffers of
`activation_buffers`, each listed in the manifest with the programs that bind it (`logits_all`: score only), so a
runtime allocates a buffer only when it first runs a program that needs it.
"""
from __future__ import annotations

from .config import ModelConfig
from .errors import UnsupportedModelError
from .ir import Program, dispatch_size, split_ref  # noqa: F401  (dispatch_size: runtimes import it from here)
from .kernels import (AddBias, Argmax, AttentionReduce, AttentionSplit, AttentionSplitSoftcap, Embed, Matmul,
                      MatmulCPU, MatmulTokens, MatvecCPU, RMSNorm, RopeKV, SampleDraw, SamplePrep, SampleTopK, Softcap)

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
CPU_WINDOW = 8   # tokens per uniform x window of the CPU-adapter prefill (matmul_cpu): one step per window of the chunk
# decode attention splits each (KV head)'s keys across this many workgroups (flash-decoding) and reduces the partials;
# prefill has a workgroup per token already and uses one split. On lavapipe 16 keeps position 1000 within 1.3x the
# attention cost of position 100 (see ARCHITECTURE.md, "attention")
DECODE_SPLITS = 16
SCORE_BYTES = 16 << 20   # the score program's (score_chunk, vocab) f32 logits buffer stays under this
# the `sample` program (GPU sampling, runtime_py/gpu_sampling.py): decode steps one submit can collect in `ring`, and
# the most logit_bias entries `sampler_cfg` holds
SAMPLE_RING = 32
SAMPLE_MAX_BIAS = 1024


def cpu_window(k: int) -> int:
    """Tokens per uniform x window of the CPU-adapter prefill for row length K (a power of two <= CPU_WINDOW, window
    <= 64 KiB); 0 where K cannot be windowed: K * 4 not a multiple of 256 (uniform offsets) or K > UNIFORM_X_MAX_K."""
    if k % 64 or k > UNIFORM_X_MAX_K:
        return 0
    t = CPU_WINDOW
    while t > 1 and t * k > UNIFORM_X_MAX_K:
        t //= 2
    return t


def score_chunk(vocab: int, prefill_chunk: int) -> int:
    """Tokens per `score` pass: at most 64 and the prefill chunk, logits_all <= SCORE_BYTES (Gemma 3: 16 tokens)."""
    fit = SCORE_BYTES // (4 * vocab) // PREFILL_TILE * PREFILL_TILE
    return max(1, min(64, prefill_chunk, fit or 1))


class Builder:
    """Emits one program for one phase. `tile` = tokens per matmul workgroup (1 for decode).
    weights: the plan, a callable name -> WeightRef (compiler/plan.py)."""

    def __init__(self, cfg: ModelConfig, weights, tile: int, score: bool = False, adapter: str = "gpu",
                 chunk: int = 128):
        self.cfg, self.W, self.tile, self.score, self.adapter = cfg, weights, tile, score, adapter
        self.chunk = chunk   # most tokens per forward of this program (the CPU-adapter prefill steps per x window)
        self.p = Program()

    # -- helpers: one per kernel family ------------------------------------------------------------------------
    def matmul(self, x: str, w: str, y: str, *, n_offset=0, n_stride=None, residual=False, gate=None,
               up: str | None = None, last_only=False):
        wr = self.W(w)
        ur = self.W(up) if up else None
        tile = 1 if last_only else self.tile
        # prefill / score on a CPU adapter (LM head included) where K allows uniform x windows (cpu_window); other K
        # there run the GPU kernels
        cpu_windows = self.adapter == "cpu" and self.tile > 1 and cpu_window(wr.k)
        for i, (row0, rows) in enumerate(wr.parts):
            if ur and ur.quant != wr.quant:
                raise UnsupportedModelError(f"{w} and {up} have different types ({wr.quant}, {ur.quant})")
            if cpu_windows:   # one step per x window of the chunk (ARCHITECTURE.md, "CPU adapters")
                self.matmul_cpu_windows(x, wr, ur, i, y, n_offset=n_offset + row0, n_stride=n_stride or wr.rows,
                                        rows=rows, residual=residual, gate=gate, last_only=last_only)
                continue
            if tile > 1:   # prefill: one invocation per (row, token); 2x the k-split tile kernel on lavapipe
                k = MatmulTokens(quant=wr.quant, tokens=tile, gate=gate, residual=residual)
            elif self.adapter == "cpu" and self.tile == 1 and wr.k <= UNIFORM_X_MAX_K:   # decode (x row 0 = token 0):
                # 3-5x Matmul on lavapipe (ARCHITECTURE.md)
                k = MatvecCPU(quant=wr.quant, xk=wr.k, gate=gate, residual=residual)
            else:
                k = Matmul(quant=wr.quant, gate=gate, residual=residual, **MATMUL_SHAPE)
            bind = [x, wr.ref(i)] + ([ur.ref(i)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset + row0, n_stride=n_stride or wr.rows)
            if "last_only" in dict(k.params):   # Matmul and the CPU-adapter kernels; MatmulTokens has none
                params["last_only"] = int(last_only)
            self.p.add(k, bind, params, [-(-rows // k.rows), 1 if last_only else f"T/{tile}", 1])

    def matmul_cpu_windows(self, x: str, wr, ur, part: int, y: str, *, n_offset, n_stride, rows, residual, gate,
                           last_only):
        """One weight part on a CPU adapter, prefill / score: a step per window of `tokens` tokens of x (bound as a
        uniform at the window's byte offset); a window at or past T dispatches nothing. matmul_cpu (each weight group
        dequantized once per window, ARCHITECTURE.md "CPU adapters"), or for the LM head on token T-1 matvec_cpu
        on the one window holding it."""
        tokens = cpu_window(wr.k)
        for t0 in range(0, self.chunk, tokens):
            xw = f"{x}+{t0 * wr.k * 4}" if t0 else x
            bind = [xw, wr.ref(part)] + ([ur.ref(part)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset, n_stride=n_stride, last_only=int(last_only))
            if last_only:
                k = MatvecCPU(quant=wr.quant, xk=wr.k, tokens=tokens, gate=gate, residual=residual)
                self.p.add(k, bind, params, [-(-rows // k.rows), f"T>{t0}", f"T<={t0 + tokens}"])
            else:
                k = MatmulCPU(quant=wr.quant, xk=wr.k, tokens=tokens, gate=gate, residual=residual)
                self.p.add(k, bind, dict(params, t0=t0), [-(-rows // k.rows_per_wg), f"T>{t0}", 1])

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
        self.attention(L, window=c.sliding_window if swa else 0)
        if c.post_norms:
            self.matmul("attn", blk + "attn_output.weight", "xn")
            self.rmsnorm_add("xn", blk + "post_attention_norm.weight", "x")
        else:
            self.matmul("attn", blk + "attn_output.weight", "x", residual=True)

    def attention(self, L: int, window: int):
        """Split-K attention: DECODE_SPLITS workgroups per KV head in decode (then a reduce), one per token in prefill."""
        c = self.cfg
        if c.head_dim % 4 or c.n_head % c.n_kv_head:
            raise UnsupportedModelError(f"attention needs head_dim % 4 == 0 and n_head % n_kv_head == 0 "
                                        f"(head_dim {c.head_dim}, {c.n_head} heads, {c.n_kv_head} KV heads)")
        splits = DECODE_SPLITS if self.tile == 1 else 1
        params = dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim, window=window, scale=c.softmax_scale,
                      splits=splits)
        kind = AttentionSplit
        if c.attn_softcap:   # gemma2
            kind, params["cap"] = AttentionSplitSoftcap, c.attn_softcap
        self.p.add(kind.for_heads(c.n_head, c.n_kv_head, c.head_dim),
                   ["qkv", f"k_cache.{L}", f"v_cache.{L}", "attn_part", "attn"], params, [c.n_kv_head, splits, "T"])
        if splits > 1:
            self.p.add(AttentionReduce(), ["attn_part", "attn"],
                       dict(n_head=c.n_head, head_dim=c.head_dim, splits=splits), [c.n_head, "T", 1])

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

    def sample(self) -> Program:
        """The `sample` program, replayed after `decode` (or the last prefill chunk) in the same pass: penalties and
        bias -> top logprobs of the raw logits (when asked) -> top-k candidates -> draw; the token goes to tokens[0],
        where the next decode step's embedding reads it, and to the ring slot State.step."""
        n = self.cfg.vocab
        self.p.add(SamplePrep(), ["sampler_cfg", "history", "logits", "logits_s", "sampler_state"], dict(n=n),
                   [1, 1, 1])
        self.p.add(SampleTopK(), ["sampler_cfg", "logits", "cand"], dict(n=n, mode=1), [1, 1, 1])
        self.p.add(SampleTopK(), ["sampler_cfg", "logits_s", "cand"], dict(n=n, mode=0), [1, 1, 1])
        self.p.add(SampleDraw(), ["sampler_cfg", "logits", "sampler_state", "cand", "history", "tokens", "ring"],
                   dict(n=n, ring=SAMPLE_RING), [1, 1, 1])
        return self.p

    def build(self) -> Program:
        self.embed()
        for L in range(self.cfg.n_layer):
            self.attention_block(L)
            self.ffn_block(L)
        self.head()
        return self.p


PROGRAMS = ("prefill", "decode", "score", "sample")
# what a generating session binds at load; `score` only runs where perplexity is measured, `sample` on the first
# request that samples on the GPU
GENERATE = ("prefill", "decode")


def activation_buffers(cfg: ModelConfig, score_tokens: int | None = None) -> dict:
    """Activation and KV buffers: {name: {shape, dtype, programs}}. Shapes use the symbols T (prefill chunk) and ctx
    (context, chosen at load); `programs` lists the programs that bind the buffer, so a runtime allocates a buffer
    when it first runs one of them (the pipeline checks the list against the programs: `buffer_programs`).
    score_tokens: the score program's chunk (adds `logits_all`)."""
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    every, fwd, gen = list(PROGRAMS), ["prefill", "decode", "score"], ["prefill", "decode", "sample"]
    bufs = {
        "tokens": {"shape": ["T"], "dtype": "u32", "programs": every},                    # (T,) ids; argmax writes [0]
        "x": {"shape": ["T", cfg.n_embd], "dtype": "f32", "programs": fwd},               # (T, D) residual stream
        "xn": {"shape": ["T", cfg.n_embd], "dtype": "f32", "programs": fwd},              # (T, D) normed / scratch
        "qkv": {"shape": ["T", q_dim + 2 * kv_dim], "dtype": "f32", "programs": fwd},     # (T, (n_head + 2 n_kv) hd)
        "attn": {"shape": ["T", q_dim], "dtype": "f32", "programs": fwd},                 # (T, n_head hd)
        # (n_head, S, hd + 2): decode's split-K partials (T = 1); prefill/score bind it with one split, never written
        "attn_part": {"shape": [cfg.n_head, DECODE_SPLITS, cfg.head_dim + 2], "dtype": "f32", "programs": fwd},
        "ff": {"shape": ["T", cfg.n_ff], "dtype": "f32", "programs": fwd},                # (T, n_ff)
        "logits": {"shape": [cfg.vocab], "dtype": "f32", "programs": gen},                # (vocab,) last token only
    }
    if score_tokens:   # (score_chunk, vocab): every token's logits, score only (12-16 MiB: not in generating sessions)
        bufs["logits_all"] = {"shape": [score_tokens, cfg.vocab], "dtype": "f32", "programs": ["score"]}
    # GPU sampling (the `sample` program, allocated on its first run); u32 words
    lp, k_max, smp = SampleDraw.lp_max, SampleDraw.k_max, ["sample"]
    bufs["sampler_cfg"] = {"shape": [12 + 2 * SAMPLE_MAX_BIAS], "dtype": "u32", "programs": smp}   # SampleCfg + bias
    bufs["history"] = {"shape": ["ctx"], "dtype": "u32", "programs": smp}              # (ctx,) the sequence's ids
    bufs["logits_s"] = {"shape": [cfg.vocab], "dtype": "f32", "programs": smp}         # (vocab,) biased + penalised
    bufs["sampler_state"] = {"shape": [4], "dtype": "u32", "programs": smp}            # [rng, logsumexp, -, -]
    bufs["cand"] = {"shape": [2, 2, k_max], "dtype": "u32", "programs": smp}           # [sample | logprobs][ids | vals]
    bufs["ring"] = {"shape": [2 * SAMPLE_RING + SAMPLE_RING * lp * 2], "dtype": "u32", "programs": smp}  # ids, lps, tops
    for L in range(cfg.n_layer):
        bufs[f"k_cache.{L}"] = {"shape": ["ctx", cfg.n_kv_head, cfg.head_dim], "dtype": "f32", "programs": fwd}
        bufs[f"v_cache.{L}"] = {"shape": ["ctx", cfg.n_kv_head, cfg.head_dim], "dtype": "f32", "programs": fwd}
    return bufs


def buffer_programs(programs: dict[str, Program]) -> dict[str, list[str]]:
    """{activation buffer: [programs that bind it]}, in program order. An adapter variant (`decode@cpu`) counts as its
    program (`decode`): it binds the same buffers, and a session runs one or the other."""
    out: dict[str, list[str]] = {}
    for name, prog in programs.items():
        base = name.split("@")[0]
        for ref in dict.fromkeys(split_ref(r)[0] for s in prog.steps for r in s.bind if "#" not in r):
            if base not in out.setdefault(ref, []):
                out[ref].append(base)
    return out


def build_programs(cfg: ModelConfig, weights, prefill_chunk: int = 128) -> dict[str, Program]:
    """weights: the plan, callable name -> WeightRef. Keys: PROGRAMS, then each `<name>@<adapter class>` variant,
    then the int8-activation variants (`decode@cpu_i8`, compiler/schedule_i8.py).
    `sample` has no adapter variant: it runs after whichever decode (or prefill) program the adapter chose."""
    chunks = {"prefill": prefill_chunk, "decode": 1, "score": score_chunk(cfg.vocab, prefill_chunk)}
    progs = {"prefill": Builder(cfg, weights, PREFILL_TILE).build(),
             "decode": Builder(cfg, weights, 1).build(),
             "score": Builder(cfg, weights, PREFILL_TILE, score=True).build(),
             "sample": Builder(cfg, weights, 1).sample()}
    for cls, names in ADAPTER_VARIANTS.items():
        for name in names:
            progs[f"{name}@{cls}"] = Builder(cfg, weights, 1 if name == "decode" else PREFILL_TILE,
                                             score=name == "score", adapter=cls, chunk=chunks[name]).build()
    from .schedule_i8 import build_i8_programs   # the int8-activation variants (decode@cpu_i8), beside this module
    progs.update(build_i8_programs(cfg, weights, chunks))
    return progs
