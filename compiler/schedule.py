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
                      MatmulTokens, RMSNorm, RopeKV, SampleDraw, SamplePrep, SampleTopK, Softcap)
from .kernels_cpu import MatmulCPU, MatvecCPU
from .schedule_cpu_attention import (DECODE_SPLITS_MAX, attention_cpu_decode, attention_cpu_prefill,
                                     cpu_attention_fits, cpu_kv_textures, cpu_q_window, kv_names)

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
assert DECODE_SPLITS == DECODE_SPLITS_MAX   # attention_cpu's splits share the attn_part buffer
SCORE_BYTES = 16 << 20   # the score program's (score_chunk, vocab) f32 logits buffer stays under this
# the `sample` program (GPU sampling, runtime_py/gpu_sampling.py): decode steps one submit can collect in `ring`, and
# the most logit_bias entries `sampler_cfg` holds
SAMPLE_RING = 32
SAMPLE_MAX_BIAS = 1024
# decode fusion (issue 14): a mat-vec whose x is an RMSNorm of a buffer, or attention_reduce of the split-K partials,
# computes that x in its prologue (workgroup memory, K f32 <= FUSE_MAX_K * 4 bytes) instead of a dispatch of its own;
# decode attention does RoPE, QK-norm and the KV-cache write in its prologue. Prefill keeps the separate steps (one
# dispatch serves T tokens there). See ARCHITECTURE.md, "fusion".
FUSE_MAX_K = 2048


def prologue_fits(k: int) -> bool:
    """Whether a decode mat-vec over K inputs can compute its x in a prologue (workgroup memory, whole groups)."""
    return k <= FUSE_MAX_K and k % 32 == 0


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
                 chunk: int = 128, kv_tex: bool = False):
        self.cfg, self.W, self.tile, self.score, self.adapter = cfg, weights, tile, score, adapter
        self.kv_tex = kv_tex   # K/V in the @cpu programs' textures k_tex.L / v_tex.L (cpu_kv_textures)
        self.chunk = chunk   # most tokens per forward of this program (the CPU-adapter prefill steps per x window)
        self.p = Program()

    # -- helpers: one per kernel family ------------------------------------------------------------------------
    @property
    def fuse(self) -> bool:
        """Decode (T = 1): the fused steps apply."""
        return self.tile == 1

    @property
    def fuse_prologues(self) -> bool:
        """Decode mat-vec prologues (norm / reduce): not on CPU adapters. There x would sit in workgroup memory instead
        of matvec_cpu's uniform binding, a per-lane loop per load on lavapipe: SmolLM2 decode@cpu measured 4.5x slower
        (ARCHITECTURE.md, "fusion"), against ~21 us saved per dispatch."""
        return self.fuse and self.adapter != "cpu"

    def pre_norm(self, x: str, weight: str, k: int):
        """The `pre` argument of matmul that fuses `rmsnorm(x, weight)` into it, or None (then the norm runs here)."""
        if self.fuse_prologues and prologue_fits(k):
            return ("norm", x, weight)
        self.rmsnorm(x, weight, "xn", width=k)
        return None

    def matmul(self, x: str, w: str, y: str, *, n_offset=0, n_stride=None, residual=False, gate=None,
               up: str | None = None, last_only=False, pre=None):
        """pre: ("norm", x, weight) or ("reduce",): x computed in the mat-vec's prologue (decode only, FUSE_MAX_K)."""
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
                # 3-5x Matmul on lavapipe (ARCHITECTURE.md); never with a prologue (Builder.fuse_prologues)
                assert not pre, "matvec_cpu reads x from a uniform binding: no prologue"
                k = MatvecCPU(quant=wr.quant, xk=wr.k, gate=gate, residual=residual)
            else:
                k = Matmul(quant=wr.quant, gate=gate, residual=residual, **MATMUL_SHAPE, **self.pre_fields(pre),
                           **(dict(xk=wr.k) if pre else {}))
            if not pre:
                xs = [x]
            elif pre[0] == "norm":   # the norm's input and weight
                xs = [pre[1], self.W(pre[2]).ref(0)]
            else:                    # attention_split's partials
                xs = ["attn_part"]
            bind = xs + [wr.ref(i)] + ([ur.ref(i)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset + row0, n_stride=n_stride or wr.rows)
            if pre and pre[0] == "norm":
                params["eps"] = self.cfg.rms_eps
            if "last_only" in dict(k.params):   # Matmul and the CPU-adapter kernels; MatmulTokens has none
                params["last_only"] = int(last_only)
            self.p.add(k, bind, params, [-(-rows // k.rows), 1 if last_only else f"T/{tile}", 1])

    def pre_fields(self, pre) -> dict:
        """The kernel fields of prologue `pre`."""
        if not pre:
            return {}
        if pre[0] == "reduce":
            return dict(pre="reduce", heads=self.cfg.n_head, splits=DECODE_SPLITS)
        return dict(pre="norm")

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
        pre = self.pre_norm("x", blk + "attn_norm.weight", c.n_embd)
        src = "xn" if pre is None else None
        for w, off in self.qkv_weights(L, q_dim, kv_dim):   # Q, K, V: one mat-vec where the plan concatenated them
            self.matmul(src, w, "qkv", n_offset=off, n_stride=qkv_dim, pre=pre)
        if c.qkv_bias:    # qwen2 (before QK-norm and RoPE, which decode does in attention's prologue)
            for name, off, n in (("attn_q", 0, q_dim), ("attn_k", q_dim, kv_dim), ("attn_v", q_dim + kv_dim, kv_dim)):
                self.add_bias(blk + name + ".bias", "qkv", n=n, offset=off, stride=qkv_dim)
        swa = bool(c.swa_layers) and c.swa_layers[L]
        inv_freq = self.W("rope_inv_freq_local" if swa and c.rope_base_local else "rope_inv_freq").ref(0)
        cpu = self.cpu_attention
        fused = self.fuse and DECODE_SPLITS > 1 and not cpu   # decode@cpu: q must be RoPE'd before attention_cpu
        if not fused:
            if c.qk_norm:
                self.rmsnorm("qkv", blk + "attn_q_norm.weight", None, width=c.head_dim, heads=c.n_head,
                             stride=qkv_dim)
                self.rmsnorm("qkv", blk + "attn_k_norm.weight", None, width=c.head_dim, heads=c.n_kv_head,
                             stride=qkv_dim, offset=q_dim)
            self.p.add(RopeKV(style=c.rope_style, kv_tex=self.kv_tex), ["qkv", inv_freq, *kv_names(L, self.kv_tex)],
                       dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim, rot_dim=c.rope_dim), ["T", 1, 1])
        window = c.sliding_window if swa else 0
        if cpu:
            self.attention_cpu(L, window)
        else:
            self.attention(L, window=window, rope=inv_freq if fused else None)
        # decode: the o-projection reduces the split-K partials in its prologue (when K fits)
        o_pre = ("reduce",) if fused and self.fuse_prologues and prologue_fits(q_dim) else None
        if fused and not o_pre:
            self.p.add(AttentionReduce(), ["attn_part", "attn"],
                       dict(n_head=c.n_head, head_dim=c.head_dim, splits=DECODE_SPLITS), [c.n_head, "T", 1])
        if c.post_norms:
            self.matmul("attn", blk + "attn_output.weight", "xn", pre=o_pre)
            self.rmsnorm_add("xn", blk + "post_attention_norm.weight", "x")
        else:
            self.matmul("attn", blk + "attn_output.weight", "x", residual=True, pre=o_pre)

    def qkv_weights(self, L: int, q_dim: int, kv_dim: int) -> list[tuple[str, int]]:
        """[(weight, output offset in qkv)]: the plan's concatenation of Q, K and V (or Q and K) where it made one
        (compiler/plan.py concat_qkv), else each of them."""
        blk, refs = f"blk.{L}.", getattr(self.W, "refs", {})
        if self.cfg.fused_qkv:   # phi3: attn_qkv's rows are [q | k | v], the qkv buffer's layout
            return [(blk + "attn_qkv.weight", 0)]
        if blk + "attn_qkv_concat.weight" in refs:
            return [(blk + "attn_qkv_concat.weight", 0)]
        if blk + "attn_qk_concat.weight" in refs:
            return [(blk + "attn_qk_concat.weight", 0), (blk + "attn_v.weight", q_dim + kv_dim)]
        return [(blk + "attn_q.weight", 0), (blk + "attn_k.weight", q_dim), (blk + "attn_v.weight", q_dim + kv_dim)]

    @property
    def cpu_attention(self) -> bool:
        """Decode on a CPU adapter: attention_cpu (q from a uniform binding) where a qkv row fits one."""
        return self.fuse and self.adapter == "cpu" and cpu_attention_fits(self.cfg)

    def attention_cpu(self, L: int, window: int):
        """decode@cpu's attention: compiler/schedule_cpu_attention.py (RoPE, QK-norm, KV write ran as steps before)."""
        attention_cpu_decode(self.p, self.cfg, L, window, self.kv_tex)

    def attention(self, L: int, window: int, rope: str | None = None):
        """Split-K attention: DECODE_SPLITS workgroups per KV head in decode (the reduce follows, on its own or in the
        o-projection's prologue), one per token in prefill. rope: the inv_freq ref when RoPE, QK-norm and the
        KV-cache write are fused into it (decode)."""
        c = self.cfg
        if c.head_dim % 4 or c.n_head % c.n_kv_head:
            raise UnsupportedModelError(f"attention needs head_dim % 4 == 0 and n_head % n_kv_head == 0 "
                                        f"(head_dim {c.head_dim}, {c.n_head} heads, {c.n_kv_head} KV heads)")
        if self.adapter == "cpu" and self.tile > 1 and not rope and cpu_q_window(c, self.chunk):
            return attention_cpu_prefill(self.p, c, L, window, self.chunk, self.kv_tex)   # prefill@cpu, score@cpu
        assert not self.kv_tex, "attention_split reads storage K/V (cpu_kv_textures)"
        splits = DECODE_SPLITS if self.tile == 1 else 1
        bind = ["qkv", f"k_cache.{L}", f"v_cache.{L}", "attn_part", "attn"]
        params = dict(n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim, window=window, scale=c.softmax_scale,
                      splits=splits)
        kind, kw = AttentionSplit, {}
        if c.attn_softcap:   # gemma2
            kind, params["cap"] = AttentionSplitSoftcap, c.attn_softcap
        if rope:
            kw = dict(rope=c.rope_style, qk_norm=c.qk_norm)
            bind.append(rope)
            if c.qk_norm:
                bind += [self.W(f"blk.{L}.attn_q_norm.weight").ref(0), self.W(f"blk.{L}.attn_k_norm.weight").ref(0)]
            params.update(rot_dim=c.rope_dim, eps=c.rms_eps)
        self.p.add(kind.for_heads(c.n_head, c.n_kv_head, c.head_dim, **kw), bind, params, [c.n_kv_head, splits, "T"])
        if splits > 1 and not rope:
            self.p.add(AttentionReduce(), ["attn_part", "attn"],
                       dict(n_head=c.n_head, head_dim=c.head_dim, splits=splits), [c.n_head, "T", 1])

    def ffn_block(self, L: int):
        c = self.cfg
        blk = f"blk.{L}."
        pre = self.pre_norm("x", blk + "ffn_norm.weight", c.n_embd)
        if c.fused_gate_up:   # phi3: ffn_up = [gate | up], sliced by the plan (compiler/plan.py split_weights)
            self.matmul("xn", blk + "ffn_up.weight:gate", "ff", gate=c.act, up=blk + "ffn_up.weight:up", pre=pre)
        else:
            self.matmul("xn", blk + "ffn_gate.weight", "ff", gate=c.act, up=blk + "ffn_up.weight", pre=pre)
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
        out = "token_embd.weight" if c.tied_output else "output.weight"
        if self.score:   # every token's logits, no sampling
            self.rmsnorm("x", "output_norm.weight", "xn", width=c.n_embd)
            self.matmul("xn", out, "logits_all", n_stride=c.vocab)
            if c.final_softcap:
                self.softcap("logits_all", c.vocab, per_token=True)
            return
        pre = self.pre_norm("x", "output_norm.weight", c.n_embd)   # decode: the final norm in the LM head's prologue
        self.matmul("xn", out, "logits", last_only=True, n_stride=c.vocab, pre=pre)
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


def activation_buffers(cfg: ModelConfig, score_tokens: int | None = None, kv_tex: bool = False) -> dict:
    """Activation and KV buffers: {name: {shape, dtype, programs}}. Shapes use the symbols T (prefill chunk) and ctx
    (context, chosen at load); `programs` lists the programs that bind the buffer, so a runtime allocates a buffer
    when it first runs one of them (the pipeline checks the list against the programs: `buffer_programs`).
    score_tokens: the score program's chunk (adds `logits_all`). kv_tex: the @cpu programs' K/V textures k_tex.L /
    v_tex.L (cpu_kv_textures; `texture`: their texel format; a runtime allocates them as textures, and a session
    allocates, of the per-position buffers, only those the program variants it runs bind)."""
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
    if kv_tex:   # the @cpu programs' K/V (cpu_kv_textures): rgba32float textures, kv_texture_shape(ctx, n_kv, hd)
        for L in range(cfg.n_layer):
            for kv in kv_names(L, True):
                bufs[kv] = {"shape": ["ctx", cfg.n_kv_head, cfg.head_dim], "dtype": "f32", "programs": fwd,
                            "texture": "rgba32float"}
    return bufs


def buffer_programs(programs: dict[str, Program]) -> dict[str, list[str]]:
    """{activation buffer: [programs that bind it]}, in PROGRAMS order. An adapter variant (`decode@cpu`) counts as its
    program (`decode`): it binds the same buffers, and a session runs one or the other (xn: only `decode@cpu` binds
    it among the decode variants, its norms not being fused)."""
    out: dict[str, list[str]] = {}
    for name, prog in programs.items():
        base = name.split("@")[0]
        for ref in dict.fromkeys(split_ref(r)[0] for s in prog.steps for r in s.bind if "#" not in r):
            if base not in out.setdefault(ref, []):
                out[ref].append(base)
    order = {p: i for i, p in enumerate(PROGRAMS)}   # others (schedule_rows.py's) after them, as they came
    return {ref: sorted(progs, key=lambda p: order.get(p, len(order))) for ref, progs in out.items()}


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
                                             score=name == "score", adapter=cls, chunk=chunks[name],
                                             kv_tex=cls == "cpu" and cpu_kv_textures(cfg, chunks)).build()
    from .schedule_i8 import build_i8_programs   # the int8-activation variants (decode@cpu_i8), beside this module
    progs.update(build_i8_programs(cfg, weights, chunks))
    return progs
