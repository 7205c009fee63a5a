"""The `score` program and perplexity (runtime_py/quality.py) on SmolLM2: every-token logits equal the decode
program's one token at a time, and the perplexity of the start of tests/fixtures/quality_text.txt is within 2% of
llama.cpp's on the same ids (the full table across `--quant` schemes: `make quality`)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from runtime_py.device import NoAdapterError, get_device
from runtime_py.quality import nll, nll_from_logits
from tests.conftest import FIXTURES

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

TEXT = (FIXTURES / "quality_text.txt").read_text()


@pytest.fixture(scope="module")
def text_ids(smollm2_tokenizer):
    return smollm2_tokenizer.encode(TEXT)


def test_manifest_has_score_program(smollm2_model):
    m = smollm2_model.manifest
    chunk, vocab = m["limits"]["score_chunk"], m["config"]["vocab"]
    assert 1 <= chunk <= m["limits"]["prefill_chunk"] and chunk * vocab * 4 <= 16 << 20
    assert m["buffers"]["logits_all"]["shape"] == [chunk, vocab]
    assert "argmax" not in {s["kernel"].split("_")[0] for s in m["programs"]["score"]}
    # prefill and decode are unchanged: one LM-head row into `logits`, then argmax
    for prog in ("prefill", "decode"):
        assert m["programs"][prog][-1]["kernel"].startswith("argmax")
        assert "logits_all" not in {b for s in m["programs"][prog] for b in s["bind"]}


def test_score_logits_equal_decode(smollm2_model, text_ids, monkeypatch):
    ids = text_ids[:10]
    s = smollm2_model.session(ctx=64)
    want = []
    for i in ids:
        s.forward([i])
        want.append(s.logits())
    want = np.array(want)
    # a small score chunk, so the 10 tokens take 3 passes (chunk boundaries, pos0 > 0)
    monkeypatch.setitem(smollm2_model.manifest["limits"], "score_chunk", 4)
    s.reset()
    got = s.score(ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert s.pos == len(ids)


def test_nll_from_logits():
    z = np.array([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    want = -(z[0, 2] - math.log(np.exp(z[0]).sum())) - (3 - math.log(3 * math.exp(3)))
    assert nll_from_logits(z, np.array([2, 0])) == pytest.approx(want, rel=1e-12)


def test_perplexity_matches_llamacpp(smollm2_model, text_ids):
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install -e .[bench]")
    from tests.models import smollm2_gguf_path
    ids = text_ids[:64]
    total, n = nll(smollm2_model.session(ctx=128), ids)
    assert n == len(ids) - 1
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), logits_all=True, n_ctx=128, n_threads=2,
                          verbose=False)
    llm.eval(ids)
    ref = nll_from_logits(np.asarray(llm.scores[:n], np.float32), np.asarray(ids[1:]))
    ppl, ref_ppl = math.exp(total / n), math.exp(ref / n)
    assert abs(ppl / ref_ppl - 1) <= 0.02, (ppl, ref_ppl)
