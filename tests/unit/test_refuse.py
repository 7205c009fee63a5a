"""Refuse what is not implemented (issue 12): every metadata key and tensor of a GGUF is read by kiln, known to be
irrelevant (compiler/config.py, compiler/tokenizer.py lists), or makes compile fail naming it.

Small GGUFs are the fuzz harness's valid base files (tests/fuzz.py base_spec, written with gguf.GGUFWriter) plus one
key or tensor; the architecture fixtures (tests/fixtures/archs) carry the real converter's output of the features
kiln does not implement yet; SmolLM2 and Gemma 3 must still compile with every key accounted for."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V

from compiler.config import read_config
from compiler.refuse import unsupported
from compiler.errors import UnsupportedModelError
from compiler.gguf_file import GGUFModel
from compiler.pipeline import Compilation, run_stages
from tests.fuzz import base_spec, write_spec
from tests.models import gemma3_gguf_path, smollm2_gguf_path
from tests.unit.test_errors import assert_cli_error, kiln

ARCHS = Path(__file__).resolve().parents[1] / "fixtures" / "archs"
HD, D, CTX = 16, 32, 128          # base_spec's head_dim, n_embd, context_length


def as_arch(spec: dict, arch: str) -> dict:
    """The llama base spec as another llama-shaped architecture: keys renamed; phi3's fused attn_qkv / ffn_up."""
    spec["meta"] = [(k, arch, t, sub) if k == "general.architecture" else
                    (k.replace("llama.", f"{arch}.", 1), v, t, sub) for k, v, t, sub in spec["meta"]]
    if arch == "phi3":
        t = {n: a for n, a, _ in spec["tensors"]}
        fused = {}
        for L in range(2):
            b = f"blk.{L}."
            fused[b + "attn_q.weight"] = (b + "attn_qkv.weight", np.concatenate(
                [t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"]]))
            fused[b + "ffn_gate.weight"] = (b + "ffn_up.weight", np.concatenate(
                [t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]]))
        spec["tensors"] = [(*fused[n], None) if n in fused else (n, a, q) for n, a, q in spec["tensors"]
                           if n in fused or not n.endswith(("attn_k.weight", "attn_v.weight", "ffn_up.weight"))]
    return spec


def tiny(tmp: Path, kind: str = "llama", meta=(), tensors=(), drop=()) -> Path:
    """base_spec(kind) with `meta` [(key, value, vtype)] and `tensors` [(name, f32 array)] added, keys in `drop`
    removed (a replaced key is dropped and added). kind qwen2 / qwen3 / phi3: the llama spec as that arch."""
    arch = kind if kind in ("qwen2", "qwen3", "phi3") else None
    spec = base_spec("llama" if arch else kind, np.random.default_rng(0))
    if arch:
        spec = as_arch(spec, arch)
    keys = {k for k, *_ in meta} | set(drop)
    spec["meta"] = [e for e in spec["meta"] if e[0] not in keys] + [(k, v, t, None) for k, v, t in meta]
    spec["tensors"] += [(n, a, None) for n, a in tensors]
    return write_spec(spec, tmp / f"{kind}.gguf")


def config(path: Path):
    return run_stages(Compilation(path, None), until="config").cfg


def refusal(path: Path) -> str:
    with pytest.raises(UnsupportedModelError) as e:
        config(path)
    msg = str(e.value)
    assert "\n" not in msg and "is not implemented" in msg, msg
    return msg


ones = lambda *s: np.ones(s, np.float32)  # noqa: E731

# (case, kind, meta added, tensors added, what the message must name)
REFUSED = [
    ("rope-yarn", "llama", [("llama.rope.scaling.type", "yarn", V.STRING),
                            ("llama.rope.scaling.factor", 1.0, V.FLOAT32),
                            ("llama.rope.scaling.original_context_length", 64, V.UINT32)],
     [], ["llama.rope.scaling.type = 'yarn' (factor 1.0)"]),
    ("qwen2-yarn", "qwen2", [("qwen2.rope.scaling.type", "yarn", V.STRING),
                             ("qwen2.rope.scaling.factor", 4.0, V.FLOAT32)],
     [], ["qwen2.rope.scaling.type = 'yarn' (factor 4.0)"]),
    ("scale-linear-true", "llama", [("llama.rope.scale_linear", True, V.BOOL)], [],   # True == 1, yet not a factor
     ["llama.rope.scale_linear = true"]),
    ("attn-softcap", "llama", [("llama.attn_logit_softcapping", 50.0, V.FLOAT32)], [],
     ["llama.attn_logit_softcapping = 50.0"]),
    ("final-softcap", "llama", [("llama.final_logit_softcapping", 30.0, V.FLOAT32)], [],
     ["llama.final_logit_softcapping = 30.0"]),
    ("sliding-window", "llama", [("llama.attention.sliding_window", 32, V.UINT32)], [],
     ["llama.attention.sliding_window = 32"]),
    ("experts", "llama", [("llama.expert_count", 8, V.UINT32), ("llama.expert_used_count", 2, V.UINT32)], [],
     ["llama.expert_count = 8", "llama.expert_used_count = 2"]),
    ("non-causal", "llama", [("llama.attention.causal", False, V.BOOL)], [], ["llama.attention.causal = false"]),
    ("unknown-arch-key", "llama", [("llama.rope.dimension_sections", [8, 8], V.ARRAY)], [],
     ["llama.rope.dimension_sections = [2 values]"]),
    ("add-eos", "llama", [("tokenizer.ggml.add_eos_token", True, V.BOOL)], [], ["tokenizer.ggml.add_eos_token = true"]),
    ("add-sep", "llama", [("tokenizer.ggml.add_sep_token", True, V.BOOL)], [], ["tokenizer.ggml.add_sep_token = true"]),
    ("fim-pad", "llama", [("tokenizer.ggml.fim_pad_token_id", 3, V.UINT32)], [],
     ["tokenizer.ggml.fim_pad_token_id = 3"]),
    ("hf-tokenizer", "llama", [("tokenizer.huggingface.json", "{}", V.STRING)], [],
     ["tokenizer.huggingface.json = '{}'"]),
    ("escaped", "llama", [("llama.rope.scaling.type", "x\x1b[31m\n", V.STRING)], [],
     ["llama.rope.scaling.type = 'x\\x1b[31m\\n'"]),
    ("rope-freqs-on-qwen3", "qwen3", [], [("rope_freqs.weight", ones(HD // 2))], ["tensor 'rope_freqs.weight'"]),
    ("longrope", "phi3", [], [("rope_factors_long.weight", ones(HD // 2)),
                              ("rope_factors_short.weight", ones(HD // 2))],
     ["tensor 'rope_factors_long.weight'", "tensor 'rope_factors_short.weight'"]),
    ("qkv-bias", "llama", [], [("blk.0.attn_q.bias", ones(2 * HD)), ("blk.0.attn_k.bias", ones(HD)),
                               ("blk.0.attn_v.bias", ones(HD))],
     ["tensor 'blk.0.attn_q.bias'", "tensor 'blk.0.attn_k.bias'", "tensor 'blk.0.attn_v.bias'"]),
    ("qk-norm-on-llama", "llama", [], [("blk.1.attn_q_norm.weight", ones(HD))], ["tensor 'blk.1.attn_q_norm.weight'"]),
    ("post-norm-on-llama", "llama", [], [("blk.0.post_ffw_norm.weight", ones(D))],
     ["tensor 'blk.0.post_ffw_norm.weight'"]),
    ("moe-router", "llama", [], [("blk.0.ffn_gate_inp.weight", ones(4, D))], ["tensor 'blk.0.ffn_gate_inp.weight'"]),
    ("gemma3-unknown-key", "gemma3", [("gemma3.attention.layer_norm_epsilon", 1e-6, V.FLOAT32)], [],
     ["gemma3.attention.layer_norm_epsilon = 1e-06"]),
    ("gemma3-softcap", "gemma3", [("gemma3.attn_logit_softcapping", 50.0, V.FLOAT32)], [],   # gemma3's own reader
     ["gemma3.attn_logit_softcapping = 50.0"]),
    ("gemma3-rope-linear", "gemma3", [("gemma3.rope.scaling.type", "linear", V.STRING),
                                      ("gemma3.rope.scaling.factor", 8.0, V.FLOAT32)], [],
     ["gemma3.rope.scaling.type = 'linear' (factor 8.0)"]),
    ("gemma3-add-eos", "gemma3", [("tokenizer.ggml.add_eos_token", True, V.BOOL)], [],
     ["tokenizer.ggml.add_eos_token = true"]),
    ("gemma3-bias", "gemma3", [], [("blk.0.attn_output.bias", ones(D))], ["tensor 'blk.0.attn_output.bias'"]),
]


@pytest.mark.parametrize("case,kind,meta,tensors,names", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_name(tmp_path, case, kind, meta, tensors, names):
    msg = refusal(tiny(tmp_path, kind, meta, tensors))
    for name in names:
        assert name in msg, (name, msg)
    assert f"kiln's {kind} model" in msg


def test_many_refusals_stay_one_short_line(tmp_path):
    biases = [(f"blk.{i}.attn_{p}.bias", ones(2 * HD if p == "q" else HD)) for i in range(2) for p in "qkv"]
    keys = [(f"llama.unknown_key_{i}" + "\x1b" * 300, i, V.UINT32) for i in range(20)]
    msg = refusal(tiny(tmp_path, meta=keys, tensors=biases))
    assert msg.count("is not implemented") == 1 and "llama.unknown_key_0\\x1b" in msg, msg
    assert msg.endswith(" more") and "\x1b" not in msg and len(msg) - len(str(tmp_path)) < 500, msg
    msg = refusal(tiny(tmp_path, tensors=biases))   # few enough to name them all
    assert all(f"tensor '{n}'" in msg for n, _ in biases) and "more" not in msg, msg


def test_value_length_differing_from_key_length_is_refused(tmp_path):
    msg = refusal(tiny(tmp_path, meta=[("llama.attention.value_length", 2 * HD, V.UINT32)]))
    assert "llama.attention.value_length = 32" in msg, msg


# (case, kind, meta added): each value is what kiln computes anyway, so the config is exactly the base file's
ACCEPTED = [
    ("descriptive-general", "llama", [("general.license", "apache-2.0", V.STRING),
                                      ("general.tags", ["a", "b"], V.ARRAY),
                                      ("general.file_type", 7, V.UINT32), ("general.quantization_version", 2, V.UINT32),
                                      ("general.base_model.0.name", "x", V.STRING)]),
    ("padding-id", "llama", [("tokenizer.ggml.padding_token_id", 2, V.UINT32),
                             ("tokenizer.ggml.seperator_token_id", 2, V.UINT32)]),
    ("named-templates", "llama", [("tokenizer.chat_templates", ["tool_use"], V.ARRAY),
                                  ("tokenizer.chat_template.tool_use", "{{ messages }}", V.STRING)]),
    ("add-eos-false", "llama", [("tokenizer.ggml.add_eos_token", False, V.BOOL),
                                ("tokenizer.ggml.add_sep_token", False, V.BOOL)]),
    ("rope-none", "llama", [("llama.rope.scaling.type", "none", V.STRING), ("llama.rope.scaling.factor", 1.0,
                                                                            V.FLOAT32)]),
    ("rope-linear-by-1", "llama", [("llama.rope.scaling.type", "linear", V.STRING),
                                   ("llama.rope.scaling.factor", 1.0, V.FLOAT32)]),
    ("rope-factor-0", "llama", [("llama.rope.scaling.factor", 0.0, V.FLOAT32), ("llama.rope.scale_linear", 1.0,
                                                                                V.FLOAT32)]),
    ("rope-unscaled-orig-ctx", "llama", [("llama.rope.scaling.original_context_length", 64, V.UINT32),
                                         ("llama.rope.scaling.finetuned", False, V.BOOL)]),
    ("window-never-slides", "llama", [("llama.attention.sliding_window", CTX, V.UINT32)]),
    ("window-0", "llama", [("llama.attention.sliding_window", 0, V.UINT32)]),
    ("no-softcap", "llama", [("llama.attn_logit_softcapping", 0.0, V.FLOAT32),
                             ("llama.final_logit_softcapping", 0.0, V.FLOAT32)]),
    ("dense", "llama", [("llama.expert_count", 0, V.UINT32), ("llama.expert_used_count", 0, V.UINT32),
                        ("llama.attention.causal", True, V.BOOL)]),
    ("gemma3-rope-linear-by-1", "gemma3", [("gemma3.rope.scaling.type", "linear", V.STRING),
                                           ("gemma3.rope.scaling.factor", 1.0, V.FLOAT32),
                                           ("tokenizer.ggml.add_eos_token", False, V.BOOL)]),
]


@pytest.mark.parametrize("case,kind,meta", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_harmless_values_accepted(tmp_path, case, kind, meta):
    (tmp_path / "base").mkdir()
    base = config(tiny(tmp_path / "base", kind))
    assert config(tiny(tmp_path, kind, meta)) == base


def test_value_length_equal_to_key_length_is_accepted(tmp_path):
    assert config(tiny(tmp_path, drop=["llama.attention.value_length"])) == config(tiny(tmp_path))


# (case, kind, meta added, tensors added, {config field: value}): implemented now, so read into the config
IMPLEMENTED = [
    ("rope-linear", "llama", [("llama.rope.scaling.type", "linear", V.STRING),
                              ("llama.rope.scaling.factor", 4.0, V.FLOAT32)], [], {"rope_scale": 4.0}),
    ("rope-factor-only", "llama", [("llama.rope.scaling.factor", 8.0, V.FLOAT32)], [],   # llama.cpp: type linear
     {"rope_scale": 8.0}),
    ("rope-scale-linear", "llama", [("llama.rope.scale_linear", 2.0, V.FLOAT32)], [], {"rope_scale": 2.0}),
    ("rope-freqs", "llama", [], [("rope_freqs.weight", ones(HD // 2))], {"rope_freqs": True}),
    ("qwen2-bias", "qwen2", [], [("blk.0.attn_q.bias", ones(2 * HD)), ("blk.0.attn_k.bias", ones(HD)),
                                 ("blk.0.attn_v.bias", ones(HD)), ("blk.1.attn_q.bias", ones(2 * HD)),
                                 ("blk.1.attn_k.bias", ones(HD)), ("blk.1.attn_v.bias", ones(HD))],
     {"qkv_bias": True}),
]


@pytest.mark.parametrize("case,kind,meta,tensors,want", IMPLEMENTED, ids=[a[0] for a in IMPLEMENTED])
def test_implemented_keys_reach_the_config(tmp_path, case, kind, meta, tensors, want):
    cfg = config(tiny(tmp_path, kind, meta, tensors))
    assert {k: getattr(cfg, k) for k in want} == want


@pytest.mark.parametrize("model", sorted(p.name for p in ARCHS.iterdir() if p.is_dir()))
def test_arch_fixtures_every_key_accounted_for(model):
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        m = GGUFModel(ARCHS / model / f"{model}-{quant}.gguf")
        assert unsupported(m, read_config(m)) == []


@pytest.mark.parametrize("path", [smollm2_gguf_path, gemma3_gguf_path], ids=["smollm2", "gemma3"])
def test_real_models_compile_as_before(path):
    c = run_stages(Compilation(path(), None), until="plan")   # every key consumed or listed irrelevant
    assert unsupported(c.model, c.cfg) == []
    assert c.cfg == read_config(c.model, refuse_unsupported=False)
    concat = [n for n in c.plan.refs if n.endswith("_concat.weight")]   # one Q/K/V (or Q/K) stack per layer
    assert len(concat) == c.cfg.n_layer
    assert len(c.plan.refs) == len(c.model.tensors) + (2 if c.cfg.rope_base_local else 1) + len(concat) \
        and not c.plan.refused


def test_inspect_marks_what_kiln_cannot_run(tmp_path):
    biased = tiny(tmp_path, tensors=[("blk.0.attn_q.bias", ones(2 * HD))])   # a bias on a llama: not implemented
    p = kiln("inspect", biased)
    assert p.returncode == 0, p.stderr
    assert "not implemented: tensor 'blk.0.attn_q.bias' (kiln compile refuses this file)" in p.stdout, p.stdout
    # a Q8_1 matrix (a type kiln has no reader for): listed with its bytes and marked, in text and in --json
    from gguf import GGMLQuantizationType as Q
    spec = base_spec("llama", np.random.default_rng(0))
    blk = np.random.default_rng(1).integers(0, 256, (2 * HD, D // 32 * 40), dtype=np.uint8)   # 40-byte blocks of 32
    blk.reshape(-1, 40)[:, :8] = np.array([1.0, 1.0], np.float32).view(np.uint8)   # d, s
    spec["tensors"] = [(n, blk, Q.Q8_1) if n == "blk.0.attn_q.weight" else (n, a, q) for n, a, q in spec["tensors"]]
    path = write_spec(spec, tmp_path / "q8_1.gguf")
    p = kiln("inspect", path)
    assert p.returncode == 0, p.stderr
    assert any(line.strip().startswith("Q8_1") and "kiln cannot run this type" in line
               for line in p.stdout.splitlines()), p.stdout
    info = json.loads(kiln("inspect", path, "--json").stdout)
    assert info["unsupported_tensor_types"] == ["Q8_1"] and info["not_implemented"] == []
    assert_cli_error(kiln("compile", path, "-o", tmp_path / "out"), "tensor type Q8_1 is not supported")


def test_bf16_and_q5_1_matrices_are_read(tmp_path):
    """BF16 and Q5_1 (and IQ4_NL) have readers now (compiler/quant/blocks32.py): such a file plans like any other."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    spec = base_spec("llama", np.random.default_rng(0))
    spec["tensors"] = [(n, a.astype(np.float32).view(np.uint16)[..., 1::2].copy().view(np.uint8), Q.BF16)
                       if n == "blk.0.attn_q.weight" else (n, quantize(a, Q.Q5_1), Q.Q5_1)
                       if n == "blk.1.ffn_down.weight" else (n, a, q) for n, a, q in spec["tensors"]]
    c = run_stages(Compilation(write_spec(spec, tmp_path / "mixed.gguf"), None), until="plan")
    assert c.plan("blk.0.attn_q.weight").quant == "bf16" and c.plan("blk.1.ffn_down.weight").quant == "q5_1"
