"""Qwen 3 (QK-norm) and Llama 3 (rope_freqs scaling) test models in the browser, and one file of each other
architecture and tensor type (Chromium, SwiftShader WebGPU),
against the references in tests/fixtures/archs: prompt ids = llama.cpp's, the first step's top-5 log-probabilities
within LOGPROB_TOL of transformers float32's log-softmax at the last prompt position, and N_GREEDY greedy tokens
identical to transformers' up to its own near-ties (top-2 margin < TIE_MARGIN). Llama 3 runs the `long` prompt
(258 tokens, past the original context of 64, where the scaled low frequencies matter).

Each artifact is compiled through runtime_py.artifacts.ensure_artifact (with the native self-test), served by the
demo app and loaded by the demo page; the page's own load-time self-test must pass too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "archs"
MODELS = json.loads((ROOT / "manifest.json").read_text())["models"]
CASES = [("qwen3", "Q8_0", "fact"), ("qwen3", "Q4_K_M", "code"), ("llama3", "F16", "long"),
         ("llama3", "Q4_K_M", "fact"),
         # the other architectures' own kernels under Chromium's WGSL compiler: add_bias, softcap, attention_softcap,
         # the sliced gate|up; BF16 / Q5_1 readers
         ("qwen2", "Q4_K_M", "fact"), ("gemma2", "Q8_0", "fact"), ("phi3", "F16", "fact"), ("qwen3", "BF16", "fact"),
         ("llama3", "Q5_1", "fact")]
N_GREEDY = 16
TIE_MARGIN = 0.02
LOGPROB_TOL = 0.02   # log-softmax differences are bounded by twice the logits' (tolerance 0.02)
TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def arch_server():
    from runtime_py.server import create_app
    from tests.e2e.conftest import Server
    files = sorted({(m, q) for m, q, _ in CASES})
    app = create_app([str(ROOT / MODELS[m]["files"][q]["file"]) for m, q in files], native=False,
                     log=lambda *a: None)
    ids = dict(zip(files, app.state.artifacts))   # model id per file, in the order given
    s = Server(app)
    yield s, ids
    s.stop()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


@pytest.mark.parametrize("model,quant,prompt", CASES, ids=[f"{m}-{q}-{p}" for m, q, p in CASES])
def test_arch_in_browser(new_page, arch_server, load_model, model, quant, prompt):
    server, ids = arch_server
    files = MODELS[model]["files"][quant]
    tf = json.loads((ROOT / files["transformers"]).read_text())[prompt]
    lc = json.loads((ROOT / files["llamacpp"]).read_text())[prompt]
    with np.load(ROOT / files["transformers_last_logits"]) as z:
        want_lp = log_softmax(z[prompt])
    page = new_page()
    page.set_default_timeout(TIMEOUT_MS)
    load_model(page, server.url, ids[(model, quant)])
    st = page.evaluate("window.kiln.engine.selftest")
    assert st["ok"], st
    r = page.evaluate("""async ([prompt, n]) => {
        const r = await window.kiln.engine.completions.create({prompt, temperature: 0, max_tokens: n, logprobs: 5});
        return {...r.kiln, logprobs: r.choices[0].logprobs};
    }""", [tf["text"], N_GREEDY])
    assert r["prompt_ids"] == lc["prompt_ids"] == tf["prompt_ids"]
    # step 0: the top-5 log-probabilities at the last prompt position, compared in sorted order (a near-tie among
    # them may swap two entries; their sorted values stay within the tolerance of each other)
    got = sorted((e["logprob"] for e in r["logprobs"]["content"][0]["top_logprobs"]), reverse=True)
    ref5 = np.sort(want_lp)[::-1][:5]
    assert len(got) == 5
    worst = float(np.abs(np.array(got) - ref5).max())
    print(f"{model}-{quant} {prompt}: {len(r['prompt_ids'])} prompt tokens, step-0 top-5 max |dlogprob| {worst:.2g}, "
          f"ids {r['ids']}, timings {r['timings']}")
    assert worst <= LOGPROB_TOL, (got, ref5)
    want = tf["greedy"][:len(r["ids"])]   # a generation may stop early at an end-of-generation token
    agree = next((i for i, (a, b) in enumerate(zip(r["ids"], want)) if a != b), len(want))
    assert agree == len(want) or tf["margins"][agree] < TIE_MARGIN, (r["ids"], want, agree)
