"""compiler.quant k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256-element super-blocks): packing loses no bit.

`dequantize_packed(pack(raw))` must equal `gguf.quants.dequantize(raw)` bit for bit
- on random blocks whose f16 scales are realistic (every other bit random), in several shapes, and packed by row parts
  as the weight packer splits big tensors;
- on every k-quant tensor of the real Gemma 3 270M Q4_K_M file (Q4_K and Q6_K), whole.
tests/unit/test_quant.py covers the all-random-bytes case (inf / NaN scales) for every scheme; the GPU side of the same
layout is tests/gpu/test_kernels_kquant.py. The Gemma tests skip when its package is not installed:
`pip install -e .[gemma]`.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from compiler.errors import UnsupportedModelError
from compiler.quant import QK_K, QuantScheme, scheme_for

K_SCHEMES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# byte range of the f16 super-block scale(s) in each GGUF block: (d, dmin) or d
F16_FIELDS = {"q2_k": (80, 84), "q3_k": (108, 110), "q4_k": (0, 4), "q5_k": (0, 4), "q6_k": (208, 210)}


def k_blocks(name: str, rows: int, k: int, rng) -> np.ndarray:
    """Random GGUF bytes of a (rows, k) tensor, with finite, model-like f16 scales (|d| ~ 1e-3 .. 1e-1)."""
    s = QuantScheme.registry[name]
    nb = rows * k // QK_K
    b = rng.integers(0, 256, (nb, s.block_bytes), dtype=np.uint8)
    a, e = F16_FIELDS[name]
    d = rng.standard_normal((nb, (e - a) // 2)) * 10.0 ** rng.uniform(-3, -1, (nb, 1))
    b[:, a:e] = d.astype(np.float16).view(np.uint8).reshape(nb, e - a)
    return b.reshape(-1)


def assert_bit_exact(name: str, raw: np.ndarray, rows: int, k: int, what: str):
    s = QuantScheme.registry[name]
    got = s.dequantize_packed(s.pack(raw, rows, k), rows, k)
    want = dequantize(raw.reshape(rows, -1), s.ggml_type).reshape(rows, k).astype(np.float32)
    assert np.isfinite(want).all(), what
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        i = np.argwhere(bad)[0]
        sb = (int(i[0]) * k + int(i[1])) // QK_K
        raise AssertionError(f"{name} {what}: {int(bad.sum())} of {bad.size} values differ; first at {tuple(i)} "
                             f"(super-block {sb}, group {int(i[1]) % QK_K // 32}): got {got[tuple(i)]!r}, "
                             f"want {want[tuple(i)]!r}")


@pytest.mark.parametrize("rows,k", [(1, 256), (3, 512), (7, 768), (2, 2048)])
@pytest.mark.parametrize("name", K_SCHEMES)
def test_random_blocks_bit_exact(name, rows, k):
    rng = np.random.default_rng(K_SCHEMES.index(name) * 1000 + rows * 10 + k)
    assert_bit_exact(name, k_blocks(name, rows, k, rng), rows, k, f"random ({rows}, {k})")


@pytest.mark.parametrize("name", K_SCHEMES)
def test_row_parts_pack_independently(name):
    # the weight packer packs a big tensor as consecutive row ranges; each part is a self-contained (n, k) layout
    s = QuantScheme.registry[name]
    rows, k = 11, 512
    raw = k_blocks(name, rows, k, np.random.default_rng(7))
    whole = dequantize(raw.reshape(rows, -1), s.ggml_type).reshape(rows, k)
    rb = raw.size // rows
    for row0, n in [(0, 4), (4, 6), (10, 1)]:
        part = s.dequantize_packed(s.pack(raw[row0 * rb:(row0 + n) * rb], n, k), n, k)
        assert np.array_equal(part.view(np.uint32), whole[row0:row0 + n].view(np.uint32)), (name, row0, n)


@pytest.mark.parametrize("name", K_SCHEMES)
def test_packed_size_is_the_gguf_size(name):
    s = QuantScheme.registry[name]
    for rows, k in [(1, 256), (3, 256), (4, 768)]:
        raw_bytes = rows * k // QK_K * s.block_bytes
        pad = s.packed_words(rows, k) * 4 - raw_bytes
        assert 0 <= pad <= 2, (name, rows, k, pad)   # only an f16 pair's odd half, at most


@pytest.mark.parametrize("name", K_SCHEMES)
def test_row_length_must_be_a_multiple_of_256(name):
    s = QuantScheme.registry[name]
    with pytest.raises(UnsupportedModelError, match="multiple of 256"):
        s.pack(np.zeros(s.block_bytes, np.uint8), 1, 128)   # 128 elements: a multiple of 32, not of 256


def test_registry_has_the_k_quants():
    from gguf import GGMLQuantizationType as GT
    for name, t in [("q2_k", GT.Q2_K), ("q3_k", GT.Q3_K), ("q4_k", GT.Q4_K), ("q5_k", GT.Q5_K), ("q6_k", GT.Q6_K)]:
        assert scheme_for(t) is QuantScheme.registry[name]
        assert QuantScheme.registry[name].block_size == QK_K


# -- real blocks: Gemma 3 270M Q4_K_M ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    from compiler.gguf_file import GGUFModel
    from tests.models import gemma3_gguf_path
    return GGUFModel(gemma3_gguf_path())   # skips, naming `pip install -e .[gemma]`, without the package


def k_tensors(m):
    return [t for t in m.tensors.values() if scheme_for(t.ggml_type).name in K_SCHEMES]


def test_gemma_has_q4_k_and_q6_k_tensors(gemma):
    kinds = {scheme_for(t.ggml_type).name for t in k_tensors(gemma)}
    assert {"q4_k", "q6_k"} <= kinds, kinds


@pytest.mark.parametrize("kind", ["q4_k", "q6_k"])
def test_gemma_real_tensors_bit_exact(gemma, kind):
    ts = [t for t in k_tensors(gemma) if scheme_for(t.ggml_type).name == kind]
    assert ts
    for t in ts:
        rows, k = t.shape
        assert_bit_exact(kind, np.array(t.data), rows, k, t.name)
        assert 0 <= QuantScheme.registry[kind].packed_words(rows, k) * 4 - t.n_bytes <= 2, t.name
