"""The row-indexed kernels of the `rows` program (compiler/kernels_rows.py) against numpy references: rope_kv_rows
(each row at its own sequence and position, written through the sequence's page table), attention_rows (each row
over its own sequence's keys read through its page table — pages scattered over the pool in random order —, prompt-
chunk rows at consecutive positions beside decode rows, GQA, sliding windows, soft-capping) and argmax_rows, on odd
shapes."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from compiler.kernels_rows import KV_PAGE, ArgmaxRows, AttentionRows, AttentionRowsSoftcap, RopeKVRows
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
    from .test_kernels import assert_close, assert_untouched, attention_ref, rope_ref
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel
    from test_kernels import assert_close, assert_untouched, attention_ref, rope_ref

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def paging(rows, ctx, slots, rng):
    """The pool's pages dealt to the `slots` sequences in random order: (row info (R + 1, 4) u32 [table0, pos, 0, 0]
    per (sequence, pos) — the extra row, past n_tokens, points at sequence 0, pos 0 —, page table (u32), pool rows
    of each sequence's positions (slots, ctx)). Each sequence's table is ctx / KV_PAGE pages at table0 = s * that."""
    per = -(-ctx // KV_PAGE)
    pages = rng.permutation(slots * per + 3).astype(np.uint32)[:slots * per]   # 3 pages no sequence owns
    info = np.zeros((len(rows) + 1, 4), np.uint32)
    for i, (slot, pos) in enumerate(rows):
        info[i, :2] = slot * per, pos
    j = np.arange(ctx)
    where = np.stack([pages[s * per + j // KV_PAGE].astype(np.int64) * KV_PAGE + j % KV_PAGE for s in range(slots)])
    return info, pages, where


# rows: (sequence, pos); ctx = positions per sequence
ROWS = {
    "decodes": [(0, 5), (2, 0), (1, 17), (3, 9)],
    "one": [(1, 30)],
    "chunk+decodes": [(2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (0, 11), (3, 1)],   # a 5-token prompt chunk of slot 2
    "long": [(0, 130), (1, 64), (1, 65), (2, 1)],
}


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("n_head,n_kv,hd,rot,base,case", [
    (3, 1, 64, 64, 10000.0, "decodes"),
    (2, 2, 64, 32, 10000.0, "chunk+decodes"),   # rot_dim < head_dim
    (1, 1, 256, 200, 1e6, "one"),               # more rotating pairs than threads
    (5, 1, 80, 80, 500000.0, "long"),
])
def test_rope_kv_rows(style, n_head, n_kv, hd, rot, base, case, rng):
    rows, ctx, slots = ROWS[case], 140, 4
    R, stride = len(rows), (n_head + 2 * n_kv) * hd
    qkv = rng.standard_normal((R + 1, stride)).astype(f32)   # row R: past n_tokens
    info, table, where = paging(rows, ctx, slots, rng)
    pool_rows = (len(table) + 3) * KV_PAGE
    kc0 = rng.standard_normal((pool_rows, n_kv, hd)).astype(f32)
    vc0 = rng.standard_normal((pool_rows, n_kv, hd)).astype(f32)
    k = RopeKVRows(style=style)
    inv_freq, _ = rope_ref(qkv[:1], n_head, n_kv, hd, rot, 0, base, style)
    got, kc, vc = run_kernel(k, dict(n_head=n_head, n_kv=n_kv, head_dim=hd, rot_dim=rot),
                             [qkv, inv_freq, info, table, kc0, vc0], [R + 1, 1, 1], n_tokens=R)
    written = np.zeros(kc0.shape, bool)
    for i, (slot, pos) in enumerate(rows):
        _, want = rope_ref(qkv[i:i + 1], n_head, n_kv, hd, rot, pos, base, style)
        assert_close(got[i:i + 1], want, rel=1e-5, what=f"{k.name} qkv row {i}")
        r = where[slot, pos]
        kv = slice(n_head * hd, (n_head + n_kv) * hd)
        assert_close(kc[r:r + 1], want[:, kv].reshape(1, n_kv, hd), rel=1e-5, what=f"{k.name} k row {i}")
        assert (vc[r] == qkv[i, (n_head + n_kv) * hd:].reshape(n_kv, hd)).all(), f"{k.name} v row {i}"
        written[r] = True
    assert_untouched(got[R:], qkv[R:], np.ones_like(got[R:], bool), f"{k.name} qkv past n_tokens")
    assert_untouched(kc, kc0, ~written, f"{k.name} k_cache other rows")
    assert_untouched(vc, vc0, ~written, f"{k.name} v_cache other rows")


@pytest.mark.parametrize("n_head,n_kv,hd,window,cap,case", [
    (3, 1, 64, 0, 0, "decodes"),
    (9, 3, 64, 0, 0, "chunk+decodes"),   # SmolLM2's heads
    (4, 1, 256, 0, 0, "long"),           # Gemma 3's heads (16 outputs per invocation), keys past a tile
    (4, 1, 256, 50, 0, "long"),          # sliding window
    (6, 2, 96, 3, 0, "chunk+decodes"),   # window shorter than the chunk, head_dim 96
    (2, 2, 64, 0, 30.0, "chunk+decodes"),   # gemma2's soft-capping
    (2, 1, 32, 0, 0, "one"),
])
def test_attention_rows(n_head, n_kv, hd, window, cap, case, rng):
    rows, ctx, slots = ROWS[case], 140, 4
    R, stride = len(rows), (n_head + 2 * n_kv) * hd
    qkv = (rng.standard_normal((R, stride)) * 2).astype(f32)
    info, table, where = paging(rows, ctx, slots, rng)
    pool_rows = (len(table) + 3) * KV_PAGE
    kc = np.full((pool_rows, n_kv, hd), np.nan, f32)   # rows no sequence owns, and positions past a row: never read
    vc = np.full((pool_rows, n_kv, hd), np.nan, f32)
    for s in range(slots):
        end = max([p + 1 for sl, p in rows if sl == s], default=0)
        kc[where[s, :end]] = rng.standard_normal((end, n_kv, hd))
        vc[where[s, :end]] = rng.standard_normal((end, n_kv, hd))
    k = (AttentionRowsSoftcap if cap else AttentionRows).for_heads(n_head, n_kv, hd)
    scale = 1 / math.sqrt(hd)
    params = dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=window, scale=scale, **(dict(cap=cap) if cap else {}))
    out0 = np.full((R + 1, n_head * hd), 7.0, f32)
    (out,) = run_kernel(k, params, [qkv, info, table, kc, vc, out0], [n_kv, 1, R + 1], n_tokens=R)
    for i, (slot, pos) in enumerate(rows):
        sk, sv = kc[where[slot]], vc[where[slot]]   # the sequence's positions 0..ctx-1, gathered
        if cap:
            want = softcap_attention_ref(qkv[i, :n_head * hd], sk, sv, n_head, n_kv, pos, scale, cap)
        else:
            want = attention_ref(qkv[i:i + 1, :n_head * hd], sk, sv, n_head, n_kv, pos, window, scale)
        assert_close(out[i:i + 1], want.reshape(1, -1), rel=1e-5, what=f"{k.name} row {i} (slot {slot}, pos {pos})")
    assert (out[R:] == 7.0).all(), f"{k.name} wrote past n_tokens"


def softcap_attention_ref(q, kc, vc, n_head, n_kv, pos, scale, cap):
    hd, out = kc.shape[2], np.zeros(n_head * kc.shape[2])
    for h in range(n_head):
        kvh = h // (n_head // n_kv)
        s = kc[:pos + 1, kvh].astype(f64) @ q[h * hd:(h + 1) * hd].astype(f64) * scale
        s = cap * np.tanh(s / cap)
        p = np.exp(s - s.max())
        out[h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[:pos + 1, kvh].astype(f64)
    return out


@pytest.mark.parametrize("R,n", [(1, 49153), (5, 257), (3, 1000)])
def test_argmax_rows(R, n, rng):
    logits = (rng.standard_normal((R + 1, n)) * 10).astype(f32)
    logits[1 % R, 3] = logits[1 % R, 40] = 1e3   # a tie: the first index wins
    token0 = np.arange(R + 4, dtype=np.uint32) + 1000
    (tok,) = run_kernel(ArgmaxRows(), dict(n=n), [logits, token0], ["T", 1, 1], n_tokens=R)
    assert tok[:R].tolist() == [int(np.argmax(logits[t])) for t in range(R)]
    assert (tok[R:] == token0[R:]).all(), "argmax_rows wrote past n_tokens"
