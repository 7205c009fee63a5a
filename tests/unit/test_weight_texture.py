"""The texture layout of CPU-adapter weights (runtime_py/weight_texture.py interleave, web/weight_texture.js mirror)
against the addressing the kernels use (shaders/_dot_cpu.wgsl.j2 <buf>_q / <buf>_s), on odd shapes."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from compiler.ir import TEXTURE_ROWS
from compiler.kernels_cpu import TEXTURE_QUANTS
from compiler.quant import QuantScheme
from runtime_py.weight_texture import QS_WORDS, interleave

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [("q8_0", 1, 32), ("q8_0", 13, 96), ("q4_1", 37, 160), ("q4_1", 16, 64)]


def packed(quant, rows, k, seed=0):
    words = QuantScheme.registry[quant].packed_words(rows, k)
    return np.random.default_rng(seed).integers(0, 2**32, words, dtype=np.uint32)


def test_qs_words_are_the_schemes_first_region():
    assert set(QS_WORDS) == set(TEXTURE_QUANTS)
    for q, n in QS_WORDS.items():
        first = QuantScheme.registry[q].regions[0]
        assert first.name == "qs" and first.words == n


@pytest.mark.parametrize("quant,rows,k", SHAPES)
def test_interleave_matches_kernel_addressing(quant, rows, k):
    src = packed(quant, rows, k)
    out = np.frombuffer(interleave(src.tobytes(), quant, rows, k), np.uint32)
    c = k // 32 * QS_WORDS[quant] // 4                 # quant texels per weight row
    rows8 = -(-rows // TEXTURE_ROWS) * TEXTURE_ROWS
    tex = src[:rows * c * 4].reshape(rows, c, 4)
    qs = out[:rows8 * c * 4].reshape(-1, 4)   # texels (the scale region may end mid-texel: the upload pads it)
    for r in range(rows):
        for t in range(c):   # <buf>_q(row, c): texel (row & ~7) * C + c * 8 + (row & 7)
            assert (qs[(r & ~7) * c + t * 8 + (r & 7)] == tex[r, t]).all()
    pad = [(r & ~7) * c + t * 8 + (r & 7) for r in range(rows, rows8) for t in range(c)]
    assert not qs[pad].any()
    # <buf>_s(i): texel rows8 * C + i, the scale words unchanged
    assert (out[rows8 * c * 4:] == src[rows * c * 4:]).all()


def test_interleave_refuses_other_schemes():
    with pytest.raises(ValueError, match="q5_0"):
        interleave(b"\0" * 64, "q5_0", 1, 32)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_interleave_matches_web_weight_texture_js(tmp_path):
    cases = [(q, r, k, packed(q, r, k, i).tolist()) for i, (q, r, k) in enumerate(SHAPES)]
    script = tmp_path / "interleave.mjs"
    script.write_text(f'import {{ interleave }} from "{(ROOT / "web" / "weight_texture.js").as_uri()}";\n'
                      f"const cases = {json.dumps(cases)};\n"
                      "console.log(JSON.stringify(cases.map(([q, r, k, w]) => {\n"
                      "  const src = new Uint8Array(new Uint32Array(w).buffer);\n"
                      "  const out = interleave(src.subarray(0), q, r, k);\n"
                      "  return Array.from(new Uint32Array(out.buffer, out.byteOffset, out.length / 4)); })));\n")
    js = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True,
                                   timeout=60).stdout)
    for (q, r, k, w), got in zip(cases, js):
        assert got == np.frombuffer(interleave(np.array(w, np.uint32).tobytes(), q, r, k), np.uint32).tolist()
