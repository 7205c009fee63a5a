"""matvec_cpu's rows-per-invocation shapes (MatvecCPU.lane_rows) against float64 numpy, on odd shapes: rows that are
not a multiple of the texture's 8-row interleave nor of the workgroup's rows, split-part offsets, gate and residual.
The default shape runs through tests/gpu/test_kernels.py (check_matmul "cpu" / "cpu8") and the model tests."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from compiler.kernels_cpu import MatvecCPU
from compiler.quant import QuantScheme
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def make_weights(quant: str, rows: int, k: int, rng):
    """(packed words, dequantised float64 (rows, K)) of a random matrix as real GGUF blocks."""
    s = QuantScheme.registry[quant]
    q = quantize(rng.standard_normal((rows, k)).astype(f32), s.ggml_type)
    raw = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    return s.pack(raw, rows, k), dequantize(q, s.ggml_type).astype(f64).reshape(rows, k)


def silu(g):
    return g / (1.0 + np.exp(-g))


@pytest.mark.parametrize("lane_rows,wg", [(1, 8), (3, 8), (4, 32), (5, 16)])
@pytest.mark.parametrize("rows,K", [(1, 32), (13, 96), (77, 160), (300, 576)])
@pytest.mark.parametrize("quant", ["q8_0", "q4_1", "q5_0"])   # texture readers and one storage reader
def test_matvec_cpu_lane_rows(quant, rows, K, lane_rows, wg, rng):
    k = MatvecCPU(quant=quant, xk=K, wg=wg, lane_rows=lane_rows)
    w, ref = make_weights(quant, rows, K, rng)
    x = rng.standard_normal((1, K)).astype(f32)
    n_offset, n_stride = 3, rows + 5
    y0 = rng.standard_normal((1, n_stride)).astype(f32)
    (y,) = run_kernel(k, dict(k=K, rows=rows, n_offset=n_offset, n_stride=n_stride, last_only=0), [x, w, y0],
                      [-(-rows // k.rows), 1, 1])
    want = x.astype(f64) @ ref.T
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    assert np.abs(y[0, n_offset:n_offset + rows] - want[0]).max() <= tol
    outside = np.r_[0:n_offset, n_offset + rows:n_stride]
    assert (y[0, outside] == y0[0, outside]).all()   # untouched


@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matvec_cpu_lane_rows_gate_residual(quant, rng):
    rows, K = 45, 96
    k = MatvecCPU(quant=quant, xk=K, wg=8, lane_rows=3, gate="silu", residual=True)
    (w, ref), (u, ref_u) = make_weights(quant, rows, K, rng), make_weights(quant, rows, K, rng)
    x = rng.standard_normal((1, K)).astype(f32)
    y0 = rng.standard_normal((1, rows)).astype(f32)
    (y,) = run_kernel(k, dict(k=K, rows=rows, n_offset=0, n_stride=rows, last_only=0), [x, w, u, y0],
                      [-(-rows // k.rows), 1, 1])
    x64 = x.astype(f64)
    want = y0.astype(f64) + silu(x64 @ ref.T) * (x64 @ ref_u.T)
    assert np.abs(y - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
