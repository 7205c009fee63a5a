"""The int8-activation kernels of CPU adapters (program variants `<program>@cpu_i8`, compiler/schedule_i8.py).

llama.cpp reaches memory speed on CPUs by quantising activations to 8 bits per 32-block and using integer dot products
on whole blocks; these kernels do the same with WGSL's `dot4I8Packed` (language extension
packed_4x8_integer_dot_product: core in wgpu / naga and in Chromium's Tint since 123). They are an approximate path:
the runtimes run them only when asked (`--activations int8`, KILN_ACTIVATIONS=int8) and the adapter has the language
feature (runtime_py/device.py supports_dot4i8, web/device.js).

    QuantizeAct   x (T, K) f32 (or rmsnorm(x) * weight, the norm fused) -> xq: per 32-block 8 words of int8, the
                  block's scale d and d * sum(q) (llama.cpp's q8_1), XQ_WORDS words per block
    MatvecCPUI8   decode mat-vec (and the prefill LM head on one window) over xq, q8_0 / q4_1 weights from textures
    MatmulCPUI8   prefill / score mat-mat over a window of `tokens` xq rows (rows are the lanes, as MatmulCPU)

The xq layout (per token, K / 32 blocks, XQ_WORDS u32 each; rows K / 32 * XQ_WORDS words apart):
    words 0..7  the 32 int8 q (element 4i + j in byte j of word i: the q8_0 weight block's own byte order)
    word 8      d (f32 bits): x ~= d * q, d = max |x| / 127
    word 9      d * sum(q) (f32 bits): what q4_1's offset m multiplies (sum_k m * x_k)
    words 10-11 0 (each block is 3 vec4s of a uniform array)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .ir import TEXTURE_WIDTH
from .kernels import MATMUL_PARAMS, Kernel, Param
from .kernels_cpu import UNIFORM_BINDING_BYTES, MatmulCPU

XQ_WORDS = 12           # u32 words per 32-block of quantised activations (see the module docstring)
I8_QUANTS = ("q8_0", "q4_1")   # weight schemes with an int8 dot (texture readers: compiler/kernels_cpu.py TEXTURE_QUANTS)
DOT4I8 = "packed_4x8_integer_dot_product"   # the WGSL language feature these kernels need


def xq_words(k: int) -> int:
    """u32 words of one token's quantised activations of row length K."""
    return k // 32 * XQ_WORDS


@dataclass(frozen=True)
class QuantizeAct(Kernel):
    """xq[t] = int8 quantisation of x[t] per 32-block (norm: of rmsnorm(x[t]) * norm_w, as rmsnorm.wgsl.j2 sums);
    one workgroup per token (see quantize_act.wgsl.j2)."""
    template: ClassVar[str] = "quantize_act"
    norm: bool = False
    wg: int = 64

    @property
    def params(self) -> tuple[Param, ...]:
        return (("k", "u32"),) + ((("eps", "f32"),) if self.norm else ())

    def bindings(self):
        return [("x", "read")] + ([("norm_w", "read")] if self.norm else []) + [("xq", "read_write")]


def _check_i8(k):
    if k.quant not in I8_QUANTS:
        raise ValueError(f"{type(k).__name__}: {k.quant} weights have no int8 dot (only {I8_QUANTS})")
    assert k.xk % 32 == 0 and k.tokens * xq_words(k.xk) * 4 <= UNIFORM_BINDING_BYTES, \
        f"xq window of {k.tokens} x {k.xk}"


@dataclass(frozen=True)
class MatvecCPUI8(Kernel):
    """MatvecCPU over int8 activations: one invocation per row, xq from a uniform binding, dot4I8Packed per block
    (see matvec_cpu_i8.wgsl.j2)."""
    template: ClassVar[str] = "matvec_cpu_i8"
    params: ClassVar[tuple[Param, ...]] = MATMUL_PARAMS
    language_features: ClassVar[tuple[str, ...]] = (DOT4I8,)
    quant: str
    xk: int             # K, compile-time: the uniform xq binding is a fixed-size array
    wg: int = 32        # invocations per workgroup (the SIMD lanes on CPU adapters)
    gate: str | None = None
    residual: bool = False
    tokens: int = 1     # xq rows bound; > 1: the prefill LM head (last_only: token T-1 = row (T-1) % tokens)
    lane_rows: int = 4  # output rows per invocation, `wg` apart (as MatvecCPU)

    tex_width: ClassVar[int] = TEXTURE_WIDTH

    def __post_init__(self):
        _check_i8(self)

    def bindings(self):
        w = [("w", "texture")] + ([("w_up", "texture")] if self.gate else [])
        return [("xq", "uniform"), *w, ("y", "read_write")]

    @property
    def rows(self) -> int:   # output rows per workgroup, for the dispatch arithmetic
        return self.wg * self.lane_rows


@dataclass(frozen=True)
class MatmulCPUI8(Kernel):
    """MatmulCPU over int8 activations: rows are the lanes (`rows` per invocation, `wg` apart), the `tokens` xq rows
    of one window per step, each weight block read once for all of them (see matmul_cpu_i8.wgsl.j2)."""
    template: ClassVar[str] = "matmul_cpu_i8"
    params: ClassVar[tuple[Param, ...]] = MatmulCPU.params
    language_features: ClassVar[tuple[str, ...]] = (DOT4I8,)
    quant: str
    xk: int
    tokens: int = 8
    rows: int = 4
    wg: int = 32
    gate: str | None = None
    residual: bool = False

    tex_width: ClassVar[int] = TEXTURE_WIDTH

    def __post_init__(self):
        _check_i8(self)

    def bindings(self):
        w = [("w", "texture")] + ([("w_up", "texture")] if self.gate else [])
        return [("xq", "uniform"), *w, ("y", "read_write")]

    @property
    def rows_per_wg(self) -> int:
        return self.rows * self.wg
