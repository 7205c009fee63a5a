"""attention_cpu (the attention of the CPU-adapter programs) against the float64 references of tests/gpu/test_kernels.py
and test_kernels_archs.py. Decode (+ attention_reduce): GQA groups 1/3/4/5 and odd head counts, sliding windows,
positions crossing the lane stride and the split boundaries, more splits than keys, head dims done in several passes
(the accumulator budget) and merged in several rounds, gemma2's soft-capping. Prefill: a step per uniform q window,
the last one short, from pos 0 and continuing a sequence. Each distinct shape compiles its own kernel (seconds
on lavapipe, cold): the shapes are shared where the case allows."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from compiler.kernels import AttentionReduce, RopeKV
from compiler.kernels_cpu import AttentionCPU, attention_cpu_block, kv_texture_shape
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
    from .test_kernels import assert_close, attention_ref, rope_ref
    from .test_kernels_archs import attention_softcap_ref
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel
    from test_kernels import assert_close, attention_ref, rope_ref
    from test_kernels_archs import attention_softcap_ref

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32 = np.float32


def kv_texels(c: np.ndarray, rows: int) -> np.ndarray:
    """(ctx, n_kv, hd) K or V -> the (H, W', 4) texels of its rgba32float texture (kv_texture_shape with H = rows):
    position j in row j % H, columns (j // H) W .. + W."""
    ctx, n_kv, hd = c.shape
    w, h = kv_texture_shape(ctx, n_kv, hd, rows)
    t = np.full((h, w, 4), np.nan, f32)
    for j in range(ctx):
        c0 = (j // h) * n_kv * hd // 4
        t[j % h, c0:c0 + n_kv * hd // 4] = c[j].reshape(-1, 4)
    return t


def test_kv_texture_shape():
    assert kv_texture_shape(2048, 3, 64) == (48, 2048)      # SmolLM2: one column block
    assert kv_texture_shape(32768, 1, 256) == (256, 8192)   # Gemma 3's whole context: 4 blocks of 8192 rows
    assert kv_texture_shape(20, 3, 64, rows=7) == (144, 7)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("style,n_head,n_kv,hd,rot,pos0,T,ctx,kv_rows", [
    ("norm", 9, 3, 64, 64, 5, 3, 12, 8192),     # SmolLM2's shape, one column block
    ("neox", 4, 1, 256, 256, 9, 4, 20, 7),      # Gemma 3's; rows 7: positions 9..12 straddle column blocks 1 and 2
    ("norm", 2, 2, 64, 32, 11, 1, 13, 5),       # decode, rot_dim < head_dim, the last block
])
def test_rope_kv_texture(style, n_head, n_kv, hd, rot, pos0, T, ctx, kv_rows, rng):
    """rope_kv writing the @cpu programs' K/V textures (textureStore, kv_texture_shape): the rotated k and v of the
    chunk's tokens land at their positions' texels, q is rotated in place, every other texel is untouched."""
    stride = (n_head + 2 * n_kv) * hd
    qkv = rng.standard_normal((T + 1, stride)).astype(f32)   # row T: past n_tokens
    kc0 = kv_texels(rng.standard_normal((ctx, n_kv, hd)).astype(f32), kv_rows)
    vc0 = kv_texels(rng.standard_normal((ctx, n_kv, hd)).astype(f32), kv_rows)
    kc0, vc0 = np.nan_to_num(kc0, nan=7.0), np.nan_to_num(vc0, nan=-7.0)   # texels past ctx: must stay
    inv_freq, want = rope_ref(qkv[:T], n_head, n_kv, hd, rot, pos0, 10000.0, style)
    k = RopeKV(style=style, kv_tex=True)
    assert k.bindings()[2:] == [("k_cache", "write_texture"), ("v_cache", "write_texture")]
    got, kc, vc = run_kernel(k, dict(n_head=n_head, n_kv=n_kv, head_dim=hd, rot_dim=rot),
                             [qkv, inv_freq, kc0, vc0], [T + 1, 1, 1], n_tokens=T, pos0=pos0)
    assert_close(got[:T], want, rel=1e-5, what="rope_kv_tex qkv")
    assert np.array_equal(got[T:], qkv[T:]), "rope_kv_tex wrote qkv past n_tokens"
    kk = np.zeros((ctx, n_kv, hd), f32)
    vv = np.zeros((ctx, n_kv, hd), f32)
    written = np.zeros((ctx, n_kv, hd), bool)
    kk[pos0:pos0 + T] = want[:, n_head * hd:(n_head + n_kv) * hd].reshape(T, n_kv, hd)
    vv[pos0:pos0 + T] = qkv[:T, (n_head + n_kv) * hd:].reshape(T, n_kv, hd)
    written[pos0:pos0 + T] = True
    mask = kv_texels(written.astype(f32), kv_rows) == 1
    assert_close(kc[mask], kv_texels(kk, kv_rows)[mask], rel=1e-5, what="rope_kv_tex k texels")
    assert np.array_equal(vc[mask], kv_texels(vv, kv_rows)[mask]), "rope_kv_tex v texels"
    assert np.array_equal(kc[~mask], kc0[~mask]) and np.array_equal(vc[~mask], vc0[~mask]), "other texels touched"


def test_block_budget():
    assert AttentionCPU(n_head=9, n_kv=3, head_dim=64).dims_per_block == 64     # SmolLM2: one pass
    assert AttentionCPU(n_head=4, n_kv=1, head_dim=256).dims_per_block == 64    # Gemma 3: 4 passes
    assert AttentionCPU(n_head=32, n_kv=2, head_dim=128).dims_per_block == 16   # 8 passes
    assert attention_cpu_block(5, 96, 256) == 48      # 96 = 2 x 48
    assert attention_cpu_block(64, 64, 256) == 4      # the floor
    assert AttentionCPU(n_head=6, n_kv=2, head_dim=128).merge_vec4s == 21   # 32 vec4s: rounds of 21 and 11
    assert AttentionCPU(n_head=6, n_kv=2, head_dim=128).dims_per_block == 64


@pytest.mark.parametrize("n_head,n_kv,hd,L,window,splits,cap,db", [
    (9, 3, 64, 1, 0, 4, 0, 0),        # first token: 3 splits without keys, 7 idle lanes
    (3, 3, 64, 9, 0, 1, 0, 0),        # group 1, one key past the 8 lanes
    (9, 3, 64, 101, 0, 4, 0, 0),      # SmolLM2's heads at position 100
    (9, 3, 64, 1001, 0, 4, 0, 0),     # ... and 1000
    (9, 3, 64, 1001, 0, 16, 0, 0),    # 16 splits: 63 keys each
    (4, 1, 256, 300, 0, 4, 0, 0),     # Gemma 3's heads: 4 blocks of 64 dims
    (4, 1, 256, 700, 512, 4, 0, 0),   # ... in its 512-key sliding window
    (6, 2, 128, 90, 0, 3, 0, 128),    # one pass of 128 dims: merge rounds of 21 and 11 vec4s
    (5, 1, 96, 77, 0, 3, 0, 0),       # odd group 5, head_dim 96 in 2 blocks
    (8, 2, 64, 200, 33, 2, 0, 8),     # group 4, window shorter than a split, 8-dim blocks
    (4, 2, 64, 300, 32, 4, 2.0, 0),   # gemma2: window 32, cap 2
    (4, 2, 64, 65, 0, 16, 50.0, 0),
])
@pytest.mark.parametrize("kv_rows", [0, 37], ids=["storage", "kvtex"])   # 37: K/V textures in column blocks
def test_attention_cpu(n_head, n_kv, hd, L, window, splits, cap, db, kv_rows, rng):
    pos0, ctx = L - 1, L + 3
    stride = (n_head + 2 * n_kv) * hd
    qkv = (rng.standard_normal((1, stride)) * 2).astype(f32)   # (1, (n_head + 2 n_kv) hd): q used
    kc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)      # (ctx, n_kv, hd)
    vc = rng.standard_normal((ctx, n_kv, hd)).astype(f32)
    kc[L:] = vc[L:] = np.nan   # past the sequence: must never be read
    scale = 1 / math.sqrt(hd)
    k = AttentionCPU(n_head=n_head, n_kv=n_kv, head_dim=hd, dims_per_block=db, softcap=bool(cap),
                     kv_tex=bool(kv_rows))
    params = dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=scale, splits=splits)
    if cap:
        params["cap"] = cap
    part0 = np.full((n_head, splits, hd + 2), 7.0, f32)   # (n_head, S, hd + 2)
    kv = [kv_texels(kc, kv_rows), kv_texels(vc, kv_rows)] if kv_rows else [kc, vc]
    (part,) = run_kernel(k, params, [qkv, *kv, part0], [n_kv, splits, 1], n_tokens=1, pos0=pos0)
    out0 = np.zeros((1, n_head * hd), f32)
    (out,) = run_kernel(AttentionReduce(), dict(n_head=n_head, head_dim=hd, splits=splits), [part, out0],
                        [n_head, 1, 1], n_tokens=1, pos0=pos0)
    q = qkv[:, :n_head * hd]
    want = attention_softcap_ref(q, kc, vc, n_head, n_kv, pos0, window, scale, cap) if cap else \
        attention_ref(q, kc, vc, n_head, n_kv, pos0, window, scale)
    assert_close(out, want, rel=1e-5, what=f"{k.name} splits={splits}")


@pytest.mark.parametrize("n_head,n_kv,hd,pos0,T,W,window,cap", [
    (9, 3, 64, 0, 20, 16, 0, 0),      # SmolLM2's heads, a prompt from pos 0 in windows of 16 (the last one short)
    (9, 3, 64, 90, 8, 16, 0, 0),      # continuing a sequence, one short window
    (4, 1, 256, 5, 11, 4, 7, 0),      # Gemma 3's heads in 4 passes, a window shorter than the prompt
    (8, 2, 64, 60, 9, 4, 33, 2.0),    # group 4, gemma2's cap
])
@pytest.mark.parametrize("kv_rows", [0, 13], ids=["storage", "kvtex"])
def test_attention_cpu_prefill(n_head, n_kv, hd, pos0, T, W, window, cap, kv_rows, rng):
    """The prefill form as the schedule chains it: a step per window of W query rows (qkv bound from row t0)."""
    L, stride = pos0 + T, (n_head + 2 * n_kv) * hd
    rows = -(-T // W) * W   # (T rounded up to W, stride): the buffer holds whole windows
    qkv = (rng.standard_normal((rows, stride)) * 2).astype(f32)
    kc = rng.standard_normal((L + 3, n_kv, hd)).astype(f32)   # (ctx, n_kv, hd)
    vc = rng.standard_normal((L + 3, n_kv, hd)).astype(f32)
    kc[L:] = vc[L:] = np.nan
    scale = 1 / math.sqrt(hd)
    k = AttentionCPU(n_head=n_head, n_kv=n_kv, head_dim=hd, softcap=bool(cap), prefill=True, tokens=W,
                     kv_tex=bool(kv_rows))
    kv = [kv_texels(kc, kv_rows), kv_texels(vc, kv_rows)] if kv_rows else [kc, vc]
    out0 = np.random.default_rng(1).standard_normal((rows + 1, n_head * hd)).astype(f32)   # (T.., n_head hd)
    out = out0
    for t0 in range(0, T, W):
        params = dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=scale, splits=1, t0=t0)
        if cap:
            params["cap"] = cap
        (out,) = run_kernel(k, params, [qkv[t0:], *kv, out], [n_kv, 1, W], n_tokens=T, pos0=pos0)
    q = qkv[:T, :n_head * hd]
    want = attention_softcap_ref(q, kc, vc, n_head, n_kv, pos0, window, scale, cap) if cap else \
        attention_ref(q, kc, vc, n_head, n_kv, pos0, window, scale)
    assert_close(out[:T], want, rel=1e-5, what=k.name)
    assert np.array_equal(out[T:], out0[T:]), f"{k.name} wrote past n_tokens"
