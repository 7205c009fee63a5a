"""Speculative decoding (runtime_py/speculate.py): greedy with prompt lookup gives exactly plain greedy's ids on every
SmolLM2 reference prompt and on two of Gemma 3's; the model drafting for itself is accepted 100%; `kiln run
--speculate ngram --json` reports the acceptance. Short generations (a score pass costs several decode steps on
lavapipe, see the bench: tests/bench_speculate.py, whose --check-refs runs every reference prompt of either model).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

from runtime_py.generate import generate                # noqa: E402
from runtime_py.sampling import GREEDY                   # noqa: E402
from runtime_py.speculate import ModelDrafter, NgramDrafter   # noqa: E402
from tests.gpu.test_api import _env                      # noqa: E402
from tests.gpu.test_smollm2 import TRANSFORMERS, run_prompt   # noqa: E402 — plain greedy, cached per prompt

N = 8           # tokens per generation: a score pass costs several decode steps on lavapipe


def speculative(model, tokenizer, name, drafter):
    s = model.session(ctx=512)
    evs = list(generate(s, tokenizer, TRANSFORMERS[name]["prompt_ids"], GREEDY, max_tokens=N, eog_ids=(),
                        speculate=drafter))
    return evs[-1]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_ngram_greedy_is_plain_greedy(smollm2_model, smollm2_tokenizer, name):
    done = speculative(smollm2_model, smollm2_tokenizer, name, NgramDrafter(k=3))
    assert done.ids == run_prompt(smollm2_model, name)[1][:N], done.timings
    t = done.timings
    assert t["speculate"] == "ngram" and 0 <= t["accepted_tokens"] <= t["draft_tokens"]


@pytest.mark.parametrize("name", ["capital", "code"])
def test_self_draft_is_always_accepted(smollm2_model, smollm2_tokenizer, name):
    done = speculative(smollm2_model, smollm2_tokenizer, name, ModelDrafter(smollm2_model, 512, "self", k=3))
    t = done.timings
    assert done.ids == run_prompt(smollm2_model, name)[1][:N]
    assert t["draft_tokens"] > 0 and t["acceptance_rate"] == 1.0, t
    assert t["passes"] < N - 1, t       # several tokens per target pass


def test_cli_speculate_reports_acceptance():
    prompt = "a b c d e f a b c d e f a b c"
    out = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", "smollm2", "-p", prompt, "-n", "6",
                          "--temperature", "0", "--speculate", "ngram", "--json"],
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    t = d["timings"]
    assert t["speculate"] == "ngram" and t["draft_tokens"] > 0 and 0 <= t["acceptance_rate"] <= 1, t
    bad = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", "smollm2", "-p", "x", "--speculate", "ngram",
                          "--draft", "smollm2"], env=_env(), capture_output=True, text=True, timeout=900)
    assert bad.returncode != 0 and "give one" in bad.stderr and "Traceback" not in bad.stderr


GEMMA3_PROMPTS = ["code", "french_emoji"]   # all seven agree too (tests/bench_speculate.py --check-refs gemma3); two
                                            # here: a Gemma 3 step is ~3x SmolLM2's on lavapipe


@pytest.fixture(scope="module")
def gemma3():
    from runtime_py.artifacts import ensure_artifact
    from runtime_py.model import Model
    from runtime_py.tokenizer import Tokenizer
    from tests.models import gemma3_gguf_path
    gemma3_gguf_path()                                 # skips, naming the package, when it is not installed
    art = ensure_artifact("gemma3", log=lambda *a: None)
    model = Model(art)
    m = model.manifest
    return model, Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])


@pytest.mark.parametrize("name", GEMMA3_PROMPTS)
def test_gemma3_ngram_greedy_is_plain_greedy(gemma3, name):
    from tests.gpu.test_gemma3 import CASES
    model, tok = gemma3
    ids = CASES[name]["prompt_ids"]
    s = model.session(ctx=512)                          # one prefill: the speculative run reuses the cached prompt
    plain = list(generate(s, tok, ids, GREEDY, max_tokens=6))[-1]
    spec = list(generate(s, tok, ids, GREEDY, max_tokens=6, speculate=NgramDrafter(k=3, adaptive=False)))[-1]
    assert spec.ids == plain.ids, (spec.timings, plain.ids)
    assert spec.timings["cached_tokens"] > 0 and spec.timings["passes"] >= 1, spec.timings
