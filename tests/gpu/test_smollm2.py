"""SmolLM2-135M-Instruct Q4_1 end to end on the GPU, against the peers' reference outputs (tests/fixtures, copied from
shared/refs): float32 transformers on the same GGUF is the numerical reference; llama.cpp is reported, not asserted
(it quantizes activations, so it drifts from exact math)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import FIXTURES, fixture_json

TRANSFORMERS = {c["name"]: c for c in fixture_json("smollm2_transformers.json")["cases"]}
LLAMACPP = {c["name"]: c for c in fixture_json("smollm2_llamacpp.json")["cases"]}
LAST_LOGITS = np.load(FIXTURES / "smollm2_transformers_last_logits.npz")
MAX_ABS_LOGIT_DIFF = 0.02
TIE_MARGIN = 0.02   # a step whose reference top-2 margin is below this is a genuine tie: tokens may differ there
N_GREEDY = 32

_greedy_cache: dict[str, tuple[np.ndarray, list[int]]] = {}


def run_prompt(model, name: str) -> tuple[np.ndarray, list[int]]:
    """(logits at the last prompt position, 32 greedy tokens) from our GPU, computed once per prompt."""
    if name not in _greedy_cache:
        s = model.session(ctx=512)
        s.forward(TRANSFORMERS[name]["prompt_ids"])
        logits = s.logits()
        ids = [s.next_token()]
        while len(ids) < N_GREEDY:
            s.forward([ids[-1]])
            ids.append(s.next_token())
        _greedy_cache[name] = (logits, ids)
    return _greedy_cache[name]


def first_tie_step(case) -> int:
    for i, top in enumerate(case["step_top5"]):
        if top[0][1] - top[1][1] < TIE_MARGIN:
            return i
    return len(case["step_top5"])


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_last_logits_match_transformers(smollm2_model, name):
    ours, _ = run_prompt(smollm2_model, name)
    ref = LAST_LOGITS[name]
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: max |dlogit| = {diff:.5f}")
    assert int(ours.argmax()) == int(ref.argmax())
    assert diff <= MAX_ABS_LOGIT_DIFF


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_greedy_matches_transformers(smollm2_model, name):
    _, ours = run_prompt(smollm2_model, name)
    case = TRANSFORMERS[name]
    ref = case["greedy_ids"]
    # the reference stops at EOS; compare up to its end or its first genuine tie
    upto = min(len(ref), first_tie_step(case), N_GREEDY)
    agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    lc = LLAMACPP[name]["greedy_ids"]
    lc_agree = next((i for i, (a, b) in enumerate(zip(ours, lc)) if a != b), min(len(ours), len(lc)))
    print(f"{name}: identical to transformers for {agree}/{len(ref)} tokens (checked up to {upto}); "
          f"to llama.cpp for {lc_agree}/{len(lc)}")
    assert ours[:upto] == ref[:upto]


def test_prompt_ids_match_references(smollm2_tokenizer):
    """Raw prompts tokenize like both peers (the chat prompt is covered in tests/unit/test_chat.py)."""
    prompts = {p["name"]: p["text"] for p in fixture_json("prompts.json")["prompts"] if "text" in p}
    for name, case in TRANSFORMERS.items():
        if name in prompts and not name.startswith("chat"):
            assert smollm2_tokenizer.encode(prompts[name]) == case["prompt_ids"] == LLAMACPP[name]["prompt_ids"]
