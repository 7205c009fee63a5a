"""Every architecture test model (tests/fixtures/archs: llama 3 rope_freqs, linear rope scaling, qwen2, qwen3, phi3,
mistral, gemma2; each as F16, Q8_0 and Q4_K_M; qwen3 also BF16 and Q5_1, llama3 Q5_1) compiled and run natively, against its references.

Per (model, file type):
- prompt ids (kiln's tokenizer.json) = llama.cpp's, for every prompt (no GPU needed);
- last-position logits of every prompt within LOGIT_TOL of transformers float32 on the same GGUF, same top-1; the
  `long` prompt (~230 tokens) runs past llama3's original context (64) and gemma2's window (32), so the scaled rope
  frequencies and the sliding window are exercised;
- N_GREEDY greedy tokens = the reference's, or the first difference is at a step where the reference's own top-2
  margin is < TIE_MARGIN (a near-tie, where a float32 reordering may legitimately flip the choice).
The artifact is compiled once per file; the models are tiny (2 layers, 256 wide, vocab 1024), the whole file takes
about a minute on lavapipe.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "archs"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
MODELS = MANIFEST["models"]
FILES = [(m, q) for m in MODELS for q in MODELS[m]["files"]]   # F16, Q8_0, Q4_K_M each; BF16 / Q5_1 for some
PROMPTS = ("fact", "code", "chat", "long")
LOGIT_TOL = 0.02
TIE_MARGIN = 0.02
N_GREEDY = 16
CTX = 384   # > the longest prompt (gemma2 `long`: ~310 tokens) + N_GREEDY


def ref(model: str, quant: str, kind: str) -> dict:
    return json.loads((ROOT / MODELS[model]["files"][quant][kind]).read_text())


def gguf(model: str, quant: str) -> Path:
    return ROOT / MODELS[model]["files"][quant]["file"]


@functools.lru_cache(maxsize=None)
def artifact(model: str, quant: str, root: Path) -> Path:
    from compiler.pipeline import compile_model
    return compile_model(gguf(model, quant), root / f"{model}-{quant}")


@pytest.fixture(scope="session")
def art_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="session")
def device():
    from runtime_py.device import NoAdapterError, get_device
    try:
        return get_device()
    except NoAdapterError as e:   # pragma: no cover - depends on the machine
        pytest.skip(f"no WebGPU adapter: {e}")


_models: dict = {}


def model_for(model: str, quant: str, root: Path):
    from runtime_py.model import Model
    key = (model, quant)
    if key not in _models:
        _models.clear()   # one model at a time: they are small, but 21 of them add up
        _models[key] = Model(artifact(model, quant, root))
    return _models[key]


@pytest.mark.parametrize("model,quant", FILES)
def test_prompt_ids(model, quant, art_root):
    from runtime_py.tokenizer import Tokenizer
    art = artifact(model, quant, art_root)
    info = json.loads((art / "manifest.json").read_text())["tokenizer"]
    tok = Tokenizer(art / "tokenizer.json", info)
    tf, lc = ref(model, quant, "transformers"), ref(model, quant, "llamacpp")
    for name in PROMPTS:
        case = tf[name]
        # add_special: llama.cpp's add_special (BOS if the model adds one: kiln's default), else no BOS
        assert tok.encode(case["text"], add_special_bos=None if case["add_special"] else False) == lc[name]["prompt_ids"] == \
            case["prompt_ids"], name


@pytest.mark.parametrize("model,quant", FILES)
def test_logits_and_greedy(model, quant, art_root, device, record_property):
    m = model_for(model, quant, art_root)
    tf = ref(model, quant, "transformers")
    with np.load(ROOT / MODELS[model]["files"][quant]["transformers_last_logits"]) as z:
        last = {k: z[k] for k in z.files}
    worst, report = 0.0, []
    for name in PROMPTS:
        case = tf[name]
        s = m.session(ctx=CTX)
        s.forward(case["prompt_ids"])
        got, want = s.logits(), last[name]
        err = float(np.abs(got.astype(np.float64) - want).max())
        worst = max(worst, err)
        assert int(got.argmax()) == int(want.argmax()) or case["margins"][0] < TIE_MARGIN, \
            f"{name}: top-1 {got.argmax()} != reference {want.argmax()}"
        assert err <= LOGIT_TOL, \
            f"{name}: max |dlogit| {err:.4f} > {LOGIT_TOL} at id {int(np.abs(got - want).argmax())}"
        toks = [s.next_token()]
        while len(toks) < N_GREEDY:
            s.forward([toks[-1]])
            toks.append(s.next_token())
        want = case["greedy"][:N_GREEDY]
        agree = next((i for i, (a, b) in enumerate(zip(toks, want)) if a != b), N_GREEDY)
        # identical, or the first difference is at a step where the reference itself is a near-tie
        assert agree == N_GREEDY or case["margins"][agree] < TIE_MARGIN, \
            f"{name}: greedy {toks} != reference {want} at step {agree} " \
            f"(reference margin {case['margins'][agree]:.3g})"
        report.append(f"{name} {len(case['prompt_ids'])} tok |dlogit| {err:.2g} greedy {agree}/{N_GREEDY}")
    record_property("max_abs_dlogit", worst)
    print(f"{model}-{quant}: max |dlogit| {worst:.3g}; " + "; ".join(report))


def test_llama3_long_prompt_reaches_the_scaled_frequencies():
    """The llama3 `long` prompt (checked above on every llama3 file) runs past the original context, where the rope
    frequencies whose wavelength exceeds original_ctx / low_freq_factor are divided by the factor: the positions at
    which ignoring rope_freqs.weight changes the logits (the manifest's ablation: |dlogit| 15.6)."""
    import gguf as gguf_py
    rp = MODELS["llama3"]["hf_config"]["rope_parameters"]
    r = gguf_py.GGUFReader(str(gguf("llama3", "F16")))
    factors = next(t for t in r.tensors if t.name == "rope_freqs.weight").data.astype(np.float64)
    dim = MODELS["llama3"]["hf_config"]["head_dim"]
    wavelen = 2 * np.pi * rp["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    low = wavelen > rp["original_max_position_embeddings"] / rp["low_freq_factor"]
    assert low.any() and np.allclose(factors[low], rp["factor"]) and (factors[~low] < rp["factor"]).all()
    n = len(ref("llama3", "F16", "transformers")["long"]["prompt_ids"])
    assert n > 2 * rp["original_max_position_embeddings"], n
    assert MODELS["llama3"]["ablations"]["rope_scaling_ignored"]["max_abs_dlogit_last"] > 1
