"""Decode fusion (issue 14): each fused kernel against its float64 numpy reference.

  - Matmul with pre="norm": y = W (rmsnorm(x) * g), the RMSNorm computed in the mat-vec's prologue;
  - Matmul with pre="reduce": y = W attention_reduce(partials), from attention_split's partials (incl.
    empty splits);
  - AttentionSplit with rope (+ qk_norm): RoPE, QK-norm and the KV-cache write of position pos in the prologue, then
    split-K attention, reduced as decode reduces it (in the o-projection's prologue: chained here through it);
    AttentionSplitSoftcap (gemma2's score soft-capping) with the same prologue.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from compiler.kernels import AttentionSplit, AttentionSplitSoftcap, Matmul
from compiler.quant import QuantScheme
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
    from .test_kernels import ACT, assert_close, assert_untouched, attention_ref, kdim, make_weights, pack, rope_ref
    from .test_kernels_archs import attention_softcap_ref
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel
    from test_kernels import ACT, assert_close, assert_untouched, attention_ref, kdim, make_weights, pack, rope_ref
    from test_kernels_archs import attention_softcap_ref

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def fused_kernel(quant, K, gate, residual, pre, heads=None, splits=None):
    extra = dict(heads=heads, splits=splits) if pre == "reduce" else {}
    return Matmul(quant=quant, rows=16, lanes=4, gate=gate, residual=residual, pre=pre, xk=K, **extra)


def run_matvec(quant, rows, K, x_bufs, params, rng, gate=None, residual=False, pre="norm", **kw):
    """One fused mat-vec dispatch (T = 1); returns (y, y0, W, U) with W / U float64."""
    scheme = QuantScheme.registry[quant]
    raw, w = make_weights(scheme, rows, K, rng)
    bufs = list(x_bufs) + [pack(scheme, raw, rows, K)]
    u = None
    if gate:
        raw_u, u = make_weights(scheme, rows, K, rng)
        bufs.append(pack(scheme, raw_u, rows, K))
    y0 = rng.standard_normal((2, rows)).astype(f32)
    k = fused_kernel(quant, K, gate, residual, pre, **kw)
    p = dict(k=K, rows=rows, n_offset=0, n_stride=rows, last_only=0, **params)
    (y,) = run_kernel(k, p, bufs + [y0], [-(-rows // k.rows), 1, 1], n_tokens=1)
    return y, y0, w, u, k


def finish(y, y0, w, u, x, gate, residual, k, what):
    want = w @ x
    if gate:
        want = ACT[gate](want) * (u @ x)
    if residual:
        want = want + y0[0]
    assert_close(y[0], want, rel=2e-4, what=f"{k.name} {what}")
    assert_untouched(y[1:], y0[1:], np.ones_like(y0[1:], bool), f"{k.name} past row 0")


@pytest.mark.parametrize("quant,rows,K,gate,residual", [
    ("q4_1", 96, 576, None, False),       # SmolLM2's QKV / LM head shape (K = 576)
    ("q4_1", 64, 576, "silu", False),     # gate/up
    ("q8_0", 40, 640, None, True),        # rows not a multiple of the workgroup's
    ("q5_0", 64, 640, "gelu_tanh", False),
    ("q4_k", 32, 512, None, False),
])
def test_matvec_norm_prologue(quant, rows, K, gate, residual, rng):
    K = kdim(QuantScheme.registry[quant], K)
    x = (rng.standard_normal((2, K)) * 3).astype(f32)   # row 1: another token, not read
    g = rng.standard_normal(K).astype(f32)
    eps = 1e-6
    y, y0, w, u, k = run_matvec(quant, rows, K, [x, g], dict(eps=eps), rng, gate, residual, pre="norm")
    v = x[0].astype(f64)
    xn = v / np.sqrt((v * v).mean() + eps) * g
    finish(y, y0, w, u, xn, gate, residual, k, "norm prologue")


def partials(rng, heads, S, hd, empty=()):
    """Random (heads, S, hd + 2) split-K partials: acc, max, sum; splits in `empty` hold no keys."""
    part = np.zeros((heads, S, hd + 2), f32)
    part[:, :, :hd] = rng.standard_normal((heads, S, hd)) * 5
    part[:, :, hd] = rng.standard_normal((heads, S)) * 4
    part[:, :, hd + 1] = rng.uniform(0.5, 20, (heads, S))
    for s in empty:
        part[:, s, :hd], part[:, s, hd], part[:, s, hd + 1] = 0, -3.4e38, 0
    return part


def reduce_ref(part):
    heads, S, hd2 = part.shape
    hd = hd2 - 2
    p = part.astype(f64)
    m = p[:, :, hd]
    e = np.exp(m - m.max(1, keepdims=True))
    return ((e[:, :, None] * p[:, :, :hd]).sum(1) / (e * p[:, :, hd + 1]).sum(1)[:, None]).reshape(-1)


@pytest.mark.parametrize("quant,rows,heads,hd,S,residual", [
    ("q4_1", 64, 9, 64, 16, True),    # SmolLM2's o-projection
    ("q4_k", 32, 4, 256, 16, False),  # Gemma 3's (then the post-attention norm)
    ("q8_0", 48, 3, 32, 5, True),
])
def test_matvec_reduce_prologue(quant, rows, heads, hd, S, residual, rng):
    part = partials(rng, heads, S, hd, empty=(S - 1, S - 2))
    K = heads * hd
    y, y0, w, u, k = run_matvec(quant, rows, K, [part], {}, rng, None, residual, pre="reduce",
                                heads=heads, splits=S)
    finish(y, y0, w, u, reduce_ref(part), None, residual, k, "reduce prologue")


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("n_head,n_kv,hd,rot,pos,window,qk_norm,cap", [
    (9, 3, 64, 64, 0, 0, False, 0),        # SmolLM2's heads, first token: the one key is the new one
    (9, 3, 64, 64, 100, 0, False, 0),
    (9, 3, 64, 64, 1000, 0, False, 0),
    (4, 1, 256, 256, 300, 0, True, 0),     # Gemma 3's heads, QK-norm
    (4, 1, 256, 256, 700, 512, True, 0),   # sliding window
    (2, 2, 64, 32, 17, 0, True, 0),        # rot_dim < head_dim
    (4, 2, 64, 64, 70, 32, False, 2.0),    # gemma2 fixture-like: soft-capped scores, window 32
    (3, 1, 96, 96, 40, 0, False, 0),       # phi3-like head_dim 96 (G * hd not a multiple of the workgroup)
])
def test_attention_rope_kv_fused(style, n_head, n_kv, hd, rot, pos, window, qk_norm, cap, rng):
    S, base, eps = 16, 10000.0, 1e-6
    stride = (n_head + 2 * n_kv) * hd
    qkv = (rng.standard_normal((1, stride)) * 2).astype(f32)
    ctx = pos + 3
    kc0 = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    vc0 = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    kc0[pos + 1:] = vc0[pos + 1:] = np.nan   # past the sequence: never read
    kc0[pos] = vc0[pos] = 1e4                # the new position: overwritten before it is read
    qn = rng.standard_normal(hd).astype(f32)
    kn = rng.standard_normal(hd).astype(f32)
    # reference: QK-norm per head (rmsnorm), then RoPE, then k, v at pos, then attention
    ref = qkv.astype(f64).copy()
    if qk_norm:
        for h in range(n_head + n_kv):
            v = ref[0, h * hd:(h + 1) * hd]
            ref[0, h * hd:(h + 1) * hd] = v / np.sqrt((v * v).mean() + eps) * (qn if h < n_head else kn)
    inv_freq, roped = rope_ref(ref.astype(f32) if not qk_norm else ref, n_head, n_kv, hd, rot, pos, base, style)
    kc_want, vc_want = kc0.astype(f64), vc0.astype(f64)
    kc_want[pos] = roped[0, n_head * hd:(n_head + n_kv) * hd].reshape(n_kv, hd)
    vc_want[pos] = qkv[0, (n_head + n_kv) * hd:].reshape(n_kv, hd)
    if cap:
        want = attention_softcap_ref(roped[:, :n_head * hd], kc_want, vc_want, n_head, n_kv, pos, window,
                                     1 / math.sqrt(hd), cap)
    else:
        want = attention_ref(roped[:, :n_head * hd], kc_want, vc_want, n_head, n_kv, pos, window, 1 / math.sqrt(hd))

    kind = AttentionSplitSoftcap if cap else AttentionSplit
    k = kind.for_heads(n_head, n_kv, hd, rope=style, qk_norm=qk_norm)
    part0 = np.full((n_head, S, hd + 2), 7.0, f32)
    out0 = rng.standard_normal((1, n_head * hd)).astype(f32)
    bufs = [qkv, kc0, vc0, part0, out0, inv_freq] + ([qn, kn] if qk_norm else [])
    params = dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=1 / math.sqrt(hd), splits=S,
                  **(dict(cap=cap) if cap else {}), rot_dim=rot, eps=eps)
    kc, vc, part, out = run_kernel(k, params, bufs, [n_kv, S, 1], n_tokens=1, pos0=pos)
    assert_close(kc[pos], kc_want[pos], rel=1e-5, what=f"{k.name} k_cache[pos]")
    assert_untouched(vc[pos], vc_want[pos].astype(f32), np.ones((n_kv, hd), bool), f"{k.name} v_cache[pos]")
    others = np.ones(kc.shape, bool)
    others[pos] = False
    assert_untouched(kc, kc0, others, f"{k.name} k_cache elsewhere")
    assert_untouched(vc, vc0, others, f"{k.name} v_cache elsewhere")
    assert_untouched(out, out0, np.ones_like(out0, bool), f"{k.name} out (S > 1: partials only)")
    assert_close(reduce_ref(part), want[0], rel=1e-5, what=f"{k.name} attention")
