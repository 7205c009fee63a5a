"""The CPU-adapter kernels' parameter dataclasses (compiler/kernels.py's conventions): mat-vec / mat-mat reading
their weights from textures with x from a uniform binding, and attention with one key per lane. The `@cpu` programs
(compiler/schedule.py `cpu_variant`, compiler/schedule_cpu_attention.py) use them where the adapter is a CPU;
ARCHITECTURE.md, "CPU adapters", records why each is shaped as it is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .ir import TEXTURE_WIDTH
from .kernels import MATMUL_PARAMS, Kernel, Param

# schemes whose CPU-adapter kernels read the weights from a texture ("texture" binding access): texel fetches are
# 16-byte loads without a per-lane loop on lavapipe (shaders/_dot_cpu.wgsl.j2); every region starts at a whole texel
TEXTURE_QUANTS = ("q8_0", "q4_1")
UNIFORM_BINDING_BYTES = 65536   # WebGPU's default maxUniformBufferBindingSize: what an x binding of these kernels fits


def _init_tex(k):
    """A CPU-adapter kernel's `tex` field: None -> whether its scheme is in TEXTURE_QUANTS; True only for those."""
    if k.tex is None:
        object.__setattr__(k, "tex", k.quant in TEXTURE_QUANTS)
    elif k.tex and k.quant not in TEXTURE_QUANTS:
        raise ValueError(f"{type(k).__name__}: {k.quant} weights have no texture reader (only {TEXTURE_QUANTS})")


def _check_x_window(k):
    assert k.tokens * k.xk * 4 <= UNIFORM_BINDING_BYTES, f"x window of {k.tokens} x {k.xk} f32"


def _uniform_x_bindings(k):
    """x from a uniform binding, the weights (and the gate's up half) from textures or storage, y written."""
    a = "texture" if k.tex else "read"
    w = [("w", a)] + ([("w_up", a)] if k.gate else [])
    return [("x", "uniform"), *w, ("y", "read_write")]


@dataclass(frozen=True)
class MatvecCPU(Kernel):
    """Decode mat-vec for CPU adapters: one invocation per row, x from a uniform binding (see matvec_cpu.wgsl.j2)."""
    template: ClassVar[str] = "matvec_cpu"
    quant: str
    xk: int             # K, compile-time: the uniform x binding is a fixed-size array (K * 4 <= 64 KiB)
    wg: int = 32        # invocations per workgroup (the SIMD lanes on CPU adapters)
    gate: str | None = None
    residual: bool = False
    tex: bool | None = None   # weights from a texture; None: where the scheme allows (TEXTURE_QUANTS)
    tokens: int = 1     # rows of the x window; > 1: the prefill LM head (last_only: token T-1 = row (T-1) % tokens)
    lane_rows: int = 4  # output rows per invocation, `wg` apart (each x load serves them all; lavapipe: 1.3-2.3x one)
    # no x prologue (Matmul's `pre`): x would leave the uniform binding for workgroup memory, 4.5x slower decode on
    # lavapipe (compiler/schedule.py Builder.fuse_prologues)
    params: ClassVar[tuple[Param, ...]] = MATMUL_PARAMS

    def __post_init__(self):
        _init_tex(self)
        _check_x_window(self)

    def bindings(self):
        return _uniform_x_bindings(self)

    @property
    def rows(self) -> int:   # output rows per workgroup, for the dispatch arithmetic
        return self.wg * self.lane_rows

    tex_width: ClassVar[int] = TEXTURE_WIDTH


@dataclass(frozen=True)
class MatmulCPU(Kernel):
    """Prefill / score mat-mat for CPU adapters: rows are the lanes, `rows` per invocation, the `tokens` tokens of one
    uniform x window (t0 ..) per step (see matmul_cpu.wgsl.j2)."""
    template: ClassVar[str] = "matmul_cpu"
    params: ClassVar[tuple[Param, ...]] = MATMUL_PARAMS + (("t0", "u32"),)
    quant: str
    xk: int             # K, compile-time: the uniform x window is a fixed-size array (tokens * K * 4 <= 64 KiB)
    tokens: int = 8     # tokens per x window (per step)
    rows: int = 4       # output rows per invocation, `wg` apart
    wg: int = 32        # invocations per workgroup (the SIMD lanes on CPU adapters)
    gate: str | None = None
    residual: bool = False
    tex: bool | None = None   # weights from a texture; None: where the scheme allows (TEXTURE_QUANTS)

    tex_width: ClassVar[int] = TEXTURE_WIDTH

    def __post_init__(self):
        _init_tex(self)
        _check_x_window(self)

    def bindings(self):
        return _uniform_x_bindings(self)

    @property
    def rows_per_wg(self) -> int:   # output rows per workgroup, for the dispatch arithmetic
        return self.rows * self.wg


@dataclass(frozen=True)
class AttentionCPU(Kernel):
    """Split-K attention for CPU adapters: lane = key, q from a uniform binding, per-lane online softmax, one merge
    through workgroup memory at the end (see attention_cpu.wgsl.j2). Decode writes AttentionSplit's partials (for
    attention_reduce); prefill (one split, a step per uniform window of `tokens` query rows) the output."""
    template: ClassVar[str] = "attention_cpu"
    n_head: int                # compile-time, with n_kv: q's uniform binding is a fixed-size array of qkv rows
    n_kv: int
    head_dim: int              # compile-time: the accumulators are unrolled per dim
    dims_per_block: int = 0    # DB: output dims per pass over the keys; 0 -> the largest under ACC_FLOATS per lane
    softcap: bool = False      # gemma2's score soft-capping (adds the `cap` uniform)
    prefill: bool = False      # T tokens: one workgroup per (KV head, token), one split, `out` written (adds `t0`)
    tokens: int = 1            # qkv rows in the uniform q window (prefill; tokens * qkv row <= 64 KiB)
    wg: int = 8                # lanes (one SIMD group of lavapipe on AVX2: the merge costs WG * G * DB loads)
    # K/V bound as rgba32float textures (kv_texture_shape) instead of storage: one 16-byte fetch per lane on lavapipe
    # where a storage vec4 is 4 scalar loads in a per-lane loop (ARCHITECTURE.md, "CPU adapters"); the @cpu programs'
    # k_tex / v_tex where compiler/schedule_cpu_attention.py cpu_kv_textures
    kv_tex: bool = False
    # accumulator floats per lane (G * DB): registers, then stack spill on lavapipe. Gemma 3 (4 x 256) in one pass ran
    # 2.6x faster at position 1000 than in 4 passes of 64 dims (each pass re-reads the keys) but took ~97 s to compile
    # cold on lavapipe (load ~7; 2 passes 50 s, 4 passes 19 s): ARCHITECTURE.md, "CPU adapters"
    ACC_FLOATS: ClassVar[int] = 256
    MERGE_FLOATS: ClassVar[int] = 256   # per lane per merge round: a_w is WG * 256 f32 = 8 KiB of workgroup memory

    def __post_init__(self):
        assert self.n_head % self.n_kv == 0 and self.head_dim % 4 == 0, self
        if not self.dims_per_block:
            object.__setattr__(self, "dims_per_block", attention_cpu_block(self.group, self.head_dim,
                                                                           self.ACC_FLOATS))
        assert self.head_dim % self.dims_per_block == 0 and self.dims_per_block % 4 == 0, self
        assert self.tokens == 1 or self.prefill, "a q window of several rows is prefill's"
        assert self.tokens * self.qkv4 * 16 <= UNIFORM_BINDING_BYTES, f"q window of {self.tokens} x {self.qkv4} vec4"

    @property
    def group(self) -> int:   # query heads per KV head
        return self.n_head // self.n_kv

    @property
    def qkv4(self) -> int:    # vec4s per qkv row: (n_head + 2 n_kv) hd / 4
        return (self.n_head + 2 * self.n_kv) * self.head_dim // 4

    @property
    def params(self) -> tuple[Param, ...]:
        base = (("n_head", "u32"), ("n_kv", "u32"), ("head_dim", "u32"), ("window", "u32"), ("scale", "f32"),
                ("splits", "u32"))
        return base + ((("cap", "f32"),) if self.softcap else ()) + ((("t0", "u32"),) if self.prefill else ())

    def bindings(self):
        kv = "kv_texture" if self.kv_tex else "read"
        return [("q", "uniform"), ("k_cache", kv), ("v_cache", kv),
                ("out", "read_write") if self.prefill else ("part", "read_write")]

    @property
    def merge_vec4s(self) -> int:
        """MV: accumulator vec4s per head that one merge round moves through workgroup memory."""
        return max(1, self.MERGE_FLOATS // (4 * self.group))


def attention_cpu_block(group: int, head_dim: int, acc_floats: int) -> int:
    """AttentionCPU's dims per block: the largest multiple of 4 dividing head_dim with group * DB <= acc_floats (4
    at least)."""
    for nb in range(1, head_dim // 4 + 1):
        db = head_dim // nb
        if head_dim % nb == 0 and db % 4 == 0 and group * db <= acc_floats:
            return db
    return 4


KV_TEXTURE_ROWS = 8192   # WebGPU's default maxTextureDimension2D: rows (positions) per column block of a KV texture


def kv_texture_shape(ctx: int, n_kv: int, head_dim: int, rows: int = KV_TEXTURE_ROWS) -> tuple[int, int]:
    """(width, height) texels of an rgba32float K or V texture for ctx positions (AttentionCPU kv_tex): H = min(ctx,
    KV_TEXTURE_ROWS) rows, position j in row j % H, columns (j // H) * W .. + W, W = n_kv * head_dim / 4 (one
    position's texels; `rows`: a smaller H, for tests). SmolLM2 at ctx 2048: 48 x 2048; a 32768-position Gemma 3 context: 256 x 8192."""
    w, h = n_kv * head_dim // 4, min(ctx, rows)
    assert w * -(-ctx // h) <= KV_TEXTURE_ROWS, f"KV texture of {ctx} positions x {w} texels"
    return w * -(-ctx // h), h
