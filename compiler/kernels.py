"""Kernel parameter dataclasses: one frozen dataclass per shader template.

A kernel instance is (template, compile-time fields). Its fields are the jinja2 context, its `name` is the pipeline
cache key and the .wgsl file name, and `params` / `bindings` describe its uniform struct and storage bindings in the
order the template declares them (binding 0 = State, 1 = Params, 2.. = storage). Anything that varies per call (sizes,
offsets, eps) is a uniform, not a template field, so a whole model needs only a handful of distinct shaders.
A kernel with a `quant` field also hands its template `quant`, the scheme's declared layout (compiler/quant), which the
`_quant_*.wgsl.j2` reader renders its word offsets from. `features` names the optional WebGPU features its WGSL needs
(e.g. "shader-f16"); the compiler writes their union into the manifest, and the runtimes request exactly those.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .quant import scheme_named

# uniform field types: "u32" | "f32"
Param = tuple[str, str]
OPTIONAL_FEATURES = ("shader-f16", "subgroups")   # the WebGPU features a kernel may declare (runtimes request them)


@dataclass(frozen=True)
class Kernel:
    template: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    features: ClassVar[tuple[str, ...]] = ()   # of OPTIONAL_FEATURES, those the WGSL needs (none so far: core only)

    @property
    def name(self) -> str:
        parts = [self.template]
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or v is False:
                continue
            parts.append(f.name if v is True else f"{f.name}{v}" if isinstance(v, int) else str(v))
        return "_".join(parts)

    def bindings(self) -> list[tuple[str, str]]:
        """[(name, "read" | "read_write")] for bindings 2.. in order."""
        raise TypeError(f"{type(self).__name__} must define bindings()")

    def context(self) -> dict:
        ctx = {"k": self, "fields": asdict(self)}
        if hasattr(self, "quant"):
            ctx["quant"] = scheme_named(self.quant).layout()
        return ctx


MATMUL_PARAMS: tuple[Param, ...] = (("k", "u32"), ("rows", "u32"), ("n_offset", "u32"), ("n_stride", "u32"),
                                    ("last_only", "u32"))
# the decode mat-vecs' x prologue (shaders/_prologue.wgsl.j2): x is computed in workgroup memory from the buffers of the
# step it replaces instead of read from a buffer that step wrote. "norm": RMSNorm (x, its weight); "reduce":
# attention_reduce of attention_split's partials. Its extra uniforms:
PRE_PARAMS: dict[str | None, tuple[Param, ...]] = {None: (), "norm": (("eps", "f32"),), "reduce": ()}


def pre_bindings(pre: str | None) -> list[tuple[str, str]]:
    """The x bindings of a mat-vec with prologue `pre` (binding 2 onwards)."""
    return {None: [("x", "read")], "norm": [("src", "read"), ("norm_w", "read")], "reduce": [("part", "read")]}[pre]


def matmul_bindings(gate: str | None, pre: str | None = None) -> list[tuple[str, str]]:
    w = [("w", "read")] + ([("w_up", "read")] if gate else [])
    return [*pre_bindings(pre), *w, ("y", "read_write")]


@dataclass(frozen=True)
class Matmul(Kernel):
    """y (+)= act(x @ W^T), one token per workgroup row: decode, and the LM head on the last token (last_only).
    pre: None | "norm" | "reduce": x from the prologue (PRE_PARAMS), decode only; xk = K then, heads / splits for
    "reduce" (the partials are (heads, splits, K / heads + 2))."""
    template: ClassVar[str] = "matmul"
    quant: str
    rows: int = 8       # output rows per workgroup
    lanes: int = 8      # threads splitting K for one row (power of two)
    gate: str | None = None   # None | "silu" | "gelu_tanh": y = act(x W^T) * (x U^T)
    residual: bool = False    # y += result (fused residual add)
    pre: str | None = None
    xk: int | None = None
    heads: int | None = None
    splits: int | None = None

    @property
    def params(self) -> tuple[Param, ...]:
        return MATMUL_PARAMS + PRE_PARAMS[self.pre]

    def bindings(self):
        return matmul_bindings(self.gate, self.pre)


@dataclass(frozen=True)
class MatmulTokens(Kernel):
    """Prefill mat-mat with one invocation per (row, token): no reduction, no barrier (see matmul_tt.wgsl.j2)."""
    template: ClassVar[str] = "matmul_tt"
    params: ClassVar[tuple[Param, ...]] = MATMUL_PARAMS[:4]   # no last_only: the LM head uses the mat-vec kernel
    quant: str
    tokens: int = 8     # tokens per workgroup (the SIMD lanes on CPU adapters)
    rows: int = 8       # output rows per workgroup
    gate: str | None = None
    residual: bool = False

    def bindings(self):   # same buffers as the k-split kernel
        return matmul_bindings(self.gate)


@dataclass(frozen=True)
class Embed(Kernel):
    template: ClassVar[str] = "embed"
    params: ClassVar[tuple[Param, ...]] = (("k", "u32"), ("rows", "u32"), ("row0", "u32"), ("scale", "f32"))
    quant: str
    wg: int = 64

    def bindings(self):
        return [("tokens", "read"), ("w", "read"), ("x", "read_write")]


@dataclass(frozen=True)
class RMSNorm(Kernel):
    template: ClassVar[str] = "rmsnorm"
    params: ClassVar[tuple[Param, ...]] = (("width", "u32"), ("heads", "u32"), ("stride", "u32"), ("offset", "u32"),
                                           ("eps", "f32"))
    inplace: bool = False
    wg: int = 64
    residual: bool = False   # out += norm(x) * weight (gemma's post-norms feeding the residual stream)

    def bindings(self):
        if self.inplace:
            assert not self.residual, "an in-place norm has no separate output to add to"
            return [("x", "read_write"), ("weight", "read")]
        return [("x", "read"), ("weight", "read"), ("out", "read_write")]


@dataclass(frozen=True)
class RopeKV(Kernel):
    template: ClassVar[str] = "rope_kv"
    params: ClassVar[tuple[Param, ...]] = (("n_head", "u32"), ("n_kv", "u32"), ("head_dim", "u32"), ("rot_dim", "u32"))
    style: str = "norm"   # "norm" | "neox"
    wg: int = 64
    # K/V written to write-only rgba32float storage textures (the @cpu programs' k_tex / v_tex: compiler/kernels_cpu.py
    # kv_texture_shape, read by AttentionCPU kv_tex) instead of storage buffers
    kv_tex: bool = False

    def bindings(self):
        kv = "write_texture" if self.kv_tex else "read_write"
        return [("qkv", "read_write"), ("inv_freq", "read"), ("k_cache", kv), ("v_cache", kv)]


@dataclass(frozen=True)
class AddBias(Kernel):
    """y[t, offset:offset + n] += bias: qwen2's Q/K/V biases on the fused qkv buffer."""
    template: ClassVar[str] = "add_bias"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"), ("offset", "u32"), ("stride", "u32"))
    wg: int = 64

    def bindings(self):
        return [("bias", "read"), ("y", "read_write")]


@dataclass(frozen=True)
class Softcap(Kernel):
    """y = cap * tanh(y / cap) in place over (rows, n): gemma2's final-logit soft-capping. per_token: T rows (the
    score program's logits_all), else one (the last token's logits)."""
    template: ClassVar[str] = "softcap"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"), ("cap", "f32"))
    per_token: bool = False
    wg: int = 256

    def bindings(self):
        return [("y", "read_write")]


@dataclass(frozen=True)
class Argmax(Kernel):
    template: ClassVar[str] = "argmax"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"),)
    wg: int = 256

    def bindings(self):
        return [("logits", "read"), ("token", "read_write")]


@dataclass(frozen=True)
class AttentionSplit(Kernel):
    """Split-K causal attention (flash-decoding), one workgroup per (KV head, key split, token); see the template."""
    template: ClassVar[str] = "attention_split"
    softcap: ClassVar[bool] = False   # AttentionSplitSoftcap
    group: int = 1             # query heads per KV head (n_head / n_kv)
    outs_per_thread: int = 1   # ceil(group * head_dim / wg)
    wg: int = 64
    # decode (T = 1) only: RoPE of q and k (rope_kv.wgsl.j2's, style "norm" | "neox"), after the per-head QK-norm when
    # qk_norm, and the KV-cache write of position pos, done in this kernel's prologue instead of their own dispatches
    rope: str | None = None
    qk_norm: bool = False

    @property
    def params(self) -> tuple[Param, ...]:
        base = (("n_head", "u32"), ("n_kv", "u32"), ("head_dim", "u32"), ("window", "u32"), ("scale", "f32"),
                ("splits", "u32"))
        return base + ((("cap", "f32"),) if self.softcap else ()) + \
            ((("rot_dim", "u32"), ("eps", "f32")) if self.rope else ())

    @classmethod
    def for_heads(cls, n_head: int, n_kv: int, head_dim: int, **kw) -> "AttentionSplit":
        g = n_head // n_kv
        return cls(group=g, outs_per_thread=-(-g * head_dim // cls.wg), **kw)

    def bindings(self):
        if not self.rope:
            return [("qkv", "read"), ("k_cache", "read"), ("v_cache", "read"), ("part", "read_write"),
                    ("out", "read_write")]
        norms = [("q_norm_w", "read"), ("k_norm_w", "read")] if self.qk_norm else []
        return [("qkv", "read"), ("k_cache", "read_write"), ("v_cache", "read_write"), ("part", "read_write"),
                ("out", "read_write"), ("inv_freq", "read"), *norms]


@dataclass(frozen=True)
class AttentionSplitSoftcap(AttentionSplit):
    """AttentionSplit with gemma2's score soft-capping (scores = cap * tanh(scores / cap) after the scale)."""
    softcap: ClassVar[bool] = True   # adds the `cap` uniform (AttentionSplit.params)

    @property
    def name(self) -> str:   # the same template: the name (pipeline cache key, file name) says which
        return "attention_split_softcap" + super().name[len("attention_split"):]


@dataclass(frozen=True)
class AttentionReduce(Kernel):
    """Combines AttentionSplit's per-split (acc, max, sum) into the attention output."""
    template: ClassVar[str] = "attention_reduce"
    params: ClassVar[tuple[Param, ...]] = (("n_head", "u32"), ("head_dim", "u32"), ("splits", "u32"))
    wg: int = 64

    def bindings(self):
        return [("part", "read"), ("out", "read_write")]


@dataclass(frozen=True)
class SamplePrep(Kernel):
    """GPU sampling 1/3: logit bias + repetition/presence/frequency penalties into a copy; logsumexp of the logits."""
    template: ClassVar[str] = "sample_prep"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"),)
    wg: int = 256

    def bindings(self):
        return [("cfg", "read"), ("history", "read"), ("logits", "read"), ("logits_s", "read_write"),
                ("state", "read_write")]


@dataclass(frozen=True)
class SampleTopK(Kernel):
    """GPU sampling 2/3: exact top-k (ties by index) by radix select; sampling candidates or logprobs."""
    template: ClassVar[str] = "sample_topk"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"), ("mode", "u32"))
    k_max: int = 64
    wg: int = 256

    def bindings(self):
        return [("cfg", "read"), ("src", "read"), ("cand", "read_write")]


@dataclass(frozen=True)
class SampleDraw(Kernel):
    """GPU sampling 3/3: top-p / min-p / temperature / Mulberry32 draw over the candidates; writes the token."""
    template: ClassVar[str] = "sample_draw"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"), ("ring", "u32"))
    k_max: int = 64
    lp_max: int = 20

    def bindings(self):
        return [("cfg", "read"), ("logits", "read"), ("state", "read_write"), ("cand", "read"),
                ("history", "read_write"), ("tokens", "read_write"), ("ring", "read_write")]
