"""kiln's q4gN weight readers (shaders/_quant_q4g*.wgsl.j2) inside the matmul and embed kernels, against float64 numpy
on `dequantize_packed` of the same packed words (compiler/quant/q4g.py, _Q4G): decode (Matmul) and prefill (MatmulTokens),
gated (two readers in one shader), residual, and K values with a partial last scale group (576 with group 128,
96 with group 64 / 128). Output buffers start random, so writes outside the output region are caught too.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from compiler.kernels import Embed, Matmul, MatmulTokens
from compiler.quant import KILN_SCHEMES
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

Q4G = sorted(KILN_SCHEMES)
f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def weights(name: str, rows: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(packed u32 words, dequantized float64 (rows, k)) of a random matrix quantized into q4gN."""
    s = KILN_SCHEMES[name]
    w = (rng.standard_normal((rows, k)) * rng.uniform(0.02, 2, (rows, 1))).astype(f32)
    packed = s.pack(s.quantize(w), rows, k)
    return packed, s.dequantize_packed(packed, rows, k).astype(f64)


def assert_close(got, want, rel=1e-4, what=""):
    want = np.asarray(want, f64)
    tol = rel * max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(np.asarray(got, f64) - want)
    assert np.all(err <= tol), f"{what}: max error {np.nanmax(err):.3g} > {tol:.3g}"


@pytest.mark.parametrize("T,rows,K,tile,gate,residual", [
    (1, 7, 96, 1, None, False),          # K < group for q4g64 / q4g128: one partial group
    (13, 37, 576, 1, None, False),       # SmolLM2's K: 4.5 groups of 128
    (13, 37, 576, "tt", None, False),
    (5, 19, 1024, "tt", "silu", False),
    (3, 21, 640, 1, "gelu_tanh", True),  # Gemma 3's K (5 groups of 128)
])
@pytest.mark.parametrize("quant", Q4G)
def test_matmul_q4g(quant, T, rows, K, tile, gate, residual, rng):
    wp, w = weights(quant, rows, K, rng)
    bufs = [rng.standard_normal((T, K)).astype(f32), wp]
    if gate:
        up, u = weights(quant, rows, K, rng)
        bufs.append(up)
    y0 = rng.standard_normal((T + 1, rows)).astype(f32)   # row T: past the tokens, must stay as is
    if tile == "tt":   # what prefill runs: one invocation per (row, token), 8 tokens per workgroup
        k, params, per_wg = MatmulTokens(quant=quant, gate=gate, residual=residual), {}, 8
    else:
        k, params, per_wg = Matmul(quant=quant, gate=gate, residual=residual), {"last_only": 0}, 1
    (y,) = run_kernel(k, dict(k=K, rows=rows, n_offset=0, n_stride=rows, **params), bufs + [y0],
                      [-(-rows // k.rows), f"T/{per_wg}", 1], n_tokens=T)
    x = bufs[0].astype(f64)
    r = x @ w.T
    if gate == "silu":
        r = r / (1 + np.exp(-r)) * (x @ u.T)
    elif gate == "gelu_tanh":
        r = 0.5 * r * (1 + np.tanh(np.sqrt(2 / np.pi) * (r + 0.044715 * r ** 3))) * (x @ u.T)
    want = y0[:T].astype(f64) * residual + r
    assert_close(y[:T], want, what=k.name)
    assert (y[T:].view(np.uint32) == y0[T:].view(np.uint32)).all(), f"{k.name}: wrote past n_tokens"


@pytest.mark.parametrize("K", [96, 576])
@pytest.mark.parametrize("quant", Q4G)
def test_embed_q4g(quant, K, rng):
    vocab, scale = 11, 1.75
    E_packed, E = weights(quant, vocab, K, rng)
    ids = np.array([5, 0, 10, 3, 4, 7, 9], np.uint32)
    x0 = rng.standard_normal((len(ids), K)).astype(f32)
    (x,) = run_kernel(Embed(quant=quant), dict(k=K, rows=vocab, row0=0, scale=scale), [ids, E_packed, x0],
                      [len(ids), 1, 1], n_tokens=len(ids))
    assert_close(x, scale * E[ids], rel=1e-6, what=f"embed {quant}")
