"""The small kernels the architectures beyond llama need, each against numpy on wgpu-py, odd shapes included:
add_bias (qwen2's Q/K/V biases), softcap (gemma2's final logits), split-K attention with score soft-capping (gemma2),
decode splits + reduce included."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from compiler.kernels import AddBias, AttentionReduce, AttentionSplitSoftcap, Softcap
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
    from .test_kernels import assert_close, assert_untouched, attention_ref
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel
    from test_kernels import assert_close, assert_untouched, attention_ref

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("n,offset,stride,T", [(1, 0, 3, 1), (64, 0, 128, 2), (65, 70, 200, 3), (200, 7, 300, 9)])
def test_add_bias(n, offset, stride, T, rng):
    y0 = rng.standard_normal((T + 1, stride)).astype(f32)   # row T: past n_tokens
    b = rng.standard_normal(n).astype(f32)
    (y,) = run_kernel(AddBias(), dict(n=n, offset=offset, stride=stride), [b, y0], [-(-n // AddBias.wg), "T", 1],
                      n_tokens=T)
    want = y0.astype(f64).copy()
    want[:T, offset:offset + n] += b
    assert_close(y, want, rel=1e-7, what="add_bias")
    outside = np.ones_like(y0, bool)
    outside[:T, offset:offset + n] = False
    assert_untouched(y, y0, outside, "add_bias outside its span")


def softcap_ref(x, cap):
    return cap * np.tanh(x.astype(f64) / cap)


@pytest.mark.parametrize("n,rows,per_token,cap", [(1, 1, False, 30.0), (1000, 1, False, 30.0),
                                                  (257, 3, True, 5.0), (1024, 2, True, 0.5)])
def test_softcap(n, rows, per_token, cap, rng):
    y0 = (rng.standard_normal((rows + 1, n)) * 40).astype(f32)   # |x| up to ~200: tanh saturates without NaN
    y0[0, 0] = 1e-4   # tiny: no cancellation trouble
    k = Softcap(per_token=per_token)
    (y,) = run_kernel(k, dict(n=n, cap=cap), [y0], [-(-n // k.wg), "T" if per_token else 1, 1], n_tokens=rows)
    live = rows if per_token else 1
    assert np.isfinite(y).all()
    assert_close(y[:live], softcap_ref(y0[:live], cap), rel=2e-7, what=k.name)
    assert_untouched(y[live:], y0[live:], np.ones_like(y0[live:], bool), f"{k.name} past its rows")


def attention_softcap_ref(q, kc, vc, n_head, n_kv, pos0, window, scale, cap):
    T, hd = q.shape[0], kc.shape[2]
    out = np.zeros((T, n_head * hd))
    for t in range(T):
        pos = pos0 + t
        start = max(0, pos + 1 - window) if window else 0
        for h in range(n_head):
            kvh = h // (n_head // n_kv)
            s = kc[start:pos + 1, kvh].astype(f64) @ q[t, h * hd:(h + 1) * hd].astype(f64) * scale
            s = cap * np.tanh(s / cap)
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[start:pos + 1, kvh].astype(f64)
    return out


@pytest.mark.parametrize("n_head,n_kv,hd,L,T,window,splits,cap", [
    (3, 1, 64, 1, 1, 0, 1, 50.0),
    (2, 2, 64, 65, 1, 0, 16, 2.0),      # decode: partials, then the reduce
    (4, 2, 64, 70, 70, 32, 1, 2.0),     # gemma2 fixture-like: window 32, cap 2, a whole prompt
    (3, 3, 256, 130, 5, 50, 1, 50.0),
    (4, 2, 64, 300, 1, 32, 16, 2.0),    # decode in the window, more splits than keys per split
])
def test_attention_split_softcap(n_head, n_kv, hd, L, T, window, splits, cap, rng):
    pos0, ctx = L - T, L + 3
    stride = (n_head + 2 * n_kv) * hd
    qkv = (rng.standard_normal((T, stride)) * 2).astype(f32)
    kc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    vc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    kc[L:] = vc[L:] = np.nan
    scale = 1 / math.sqrt(hd)
    k = AttentionSplitSoftcap.for_heads(n_head, n_kv, hd)
    part0 = np.full((T + 1, n_head, splits, hd + 2), 7.0, f32)
    out0 = rng.standard_normal((T + 1, n_head * hd)).astype(f32)
    part, out = run_kernel(k, dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=scale, splits=splits,
                                   cap=cap), [qkv, kc, vc, part0, out0], [n_kv, splits, T + 1], n_tokens=T, pos0=pos0)
    if splits > 1:
        (out,) = run_kernel(AttentionReduce(), dict(n_head=n_head, head_dim=hd, splits=splits),
                            [part, out0], [n_head, T + 1, 1], n_tokens=T, pos0=pos0)
    want = attention_softcap_ref(qkv[:, :n_head * hd], kc, vc, n_head, n_kv, pos0, window, scale, cap)
    assert_close(out[:T], want, rel=1e-5, what=k.name)
    assert_untouched(out[T:], out0[T:], np.ones_like(out0[T:], bool), f"{k.name} past n_tokens")
    if L == 1:
        return   # one key: softmax is 1 whatever the scores
    # the cap changes the result (else this test could not fail on a kernel that ignores it)
    plain = attention_ref(qkv[:, :n_head * hd], kc, vc, n_head, n_kv, pos0, window, scale)
    assert np.abs(plain - want).max() > 1e-3
