"""Split-K attention (attention_split + attention_reduce) against the float64 reference of tests/gpu/test_kernels.py,
for one split (prefill: normalised output written directly) and several (decode: partials, then the reduce), with
grouped-query heads, sliding windows, more splits than keys, and tiles that end mid-way."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from compiler.kernels import AttentionReduce, AttentionSplit
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

f32 = np.float32


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def run_attention(qkv, kc, vc, n_head, n_kv, hd, T, pos0, window, splits):
    """Both kernels as the schedule chains them; returns (out, part) with out's row T (past n_tokens) included."""
    k = AttentionSplit.for_heads(n_head, n_kv, hd)
    scale = 1 / math.sqrt(hd)
    part0 = np.full((T + 1, n_head, splits, hd + 2), 7.0, f32)
    out0 = np.random.default_rng(1).standard_normal((T + 1, n_head * hd)).astype(f32)
    part, out = run_kernel(k, dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=scale, splits=splits),
                           [qkv, kc, vc, part0, out0], [n_kv, splits, T + 1], n_tokens=T, pos0=pos0)
    if splits > 1:
        assert_untouched(out, out0, np.ones(out.shape, bool), f"{k.name}: out with {splits} splits")
        (out,) = run_kernel(AttentionReduce(), dict(n_head=n_head, head_dim=hd, splits=splits),
                            [part, out0], [n_head, T + 1, 1], n_tokens=T, pos0=pos0)
    assert_untouched(out[T:], out0[T:], np.ones_like(out0[T:], bool), f"{k.name} past n_tokens")
    return out, k


@pytest.mark.parametrize("n_head,n_kv,hd,L,T,window,splits", [
    (3, 1, 64, 1, 1, 0, 1),       # first token
    (3, 1, 64, 1, 1, 0, 16),      # first token, 15 empty splits
    (3, 1, 64, 65, 1, 0, 1),      # one key past a tile
    (9, 3, 64, 101, 1, 0, 16),    # SmolLM2's heads at position 100
    (9, 3, 64, 1001, 1, 0, 16),   # ... and 1000: 63 keys per split
    (9, 3, 64, 1001, 1, 0, 3),    # several tiles per split
    (4, 1, 256, 300, 1, 0, 16),   # Gemma 3's heads (head_dim 256: 16 outputs per invocation)
    (4, 1, 256, 300, 1, 100, 16), # sliding window
    (2, 2, 256, 130, 5, 0, 1),    # prefill continuing a sequence
    (3, 1, 256, 130, 4, 50, 1),
    (6, 2, 96, 70, 70, 0, 1),     # whole prompt from pos 0, head_dim 96
    (3, 3, 64, 130, 67, 30, 1),   # long prefill with a window shorter than a tile
    (3, 3, 64, 130, 7, 30, 4),    # prefill through the split path
])
def test_attention_split(n_head, n_kv, hd, L, T, window, splits, rng):
    pos0 = L - T
    ctx = L + 3
    stride = (n_head + 2 * n_kv) * hd
    qkv = (rng.standard_normal((T, stride)) * 2).astype(f32)
    kc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    vc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    kc[L:] = vc[L:] = np.nan   # past the sequence: must never be read
    out, k = run_attention(qkv, kc, vc, n_head, n_kv, hd, T, pos0, window, splits)
    want = attention_ref(qkv[:, :n_head * hd], kc, vc, n_head, n_kv, pos0, window, 1 / math.sqrt(hd))
    assert_close(out[:T], want, rel=1e-5, what=f"{k.name} splits={splits}")
