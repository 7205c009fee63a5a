"""Speculative decoding (runtime_py/speculate.py) without a GPU: a mock target whose logits depend on the last two
tokens of the sequence in its cache (so every rewind and cache mistake changes the output), a tiny vocabulary.
Greedy with either drafter gives exactly plain greedy's ids; a model drafting for itself is always accepted; sampled
speculation leaves the output distribution unchanged (empirical frequencies over many seeds against the exact
enumeration); stop strings, EOS, max_tokens and grammar masks end it as they end plain generation.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime_py.generate import Done, generate
from runtime_py.sampling import GREEDY, SamplingParams
from runtime_py.speculate import ModelDrafter, NgramDrafter

VOCAB = 6
EOS = 5


class Tok:
    """Token i decodes to the letter 'a' + i; EOS to nothing."""
    eog_ids = {EOS}
    vocab_size = VOCAB

    def decode(self, ids, skip_special=False):
        return "".join("" if i == EOS else chr(97 + i) for i in ids)


class MockModel:
    def __init__(self, seed=0, scale=3.0, eos_bias=-4.0):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(VOCAB, VOCAB, VOCAB)) * scale      # (prev2, prev1) -> logits
        self.table[..., EOS] += eos_bias
        self.manifest = {"limits": {"score_chunk": 8}}
        self.config = {"vocab": VOCAB}

    def session(self, ctx=None):
        return MockSession(self, ctx or 256)

    def row(self, seq):
        return self.table[seq[-2] if len(seq) > 1 else 0, seq[-1]].astype(np.float32)


class MockSession:
    def __init__(self, model, ctx):
        self.model, self.ctx, self.cache, self.passes = model, ctx, [], 0

    chunk = 4                                            # prefill chunk (runtime_py/kvcache.py reads it)

    @property
    def pos(self):
        return len(self.cache)

    @property
    def held(self):                                      # the ids in the cache (prefix reuse)
        return self.cache

    def reset(self, pos=0):
        del self.cache[pos:]

    def forward(self, ids):
        assert self.pos + len(ids) <= self.ctx
        self.cache += list(ids)
        self.passes += 1

    def logits(self):
        return self.model.row(self.cache)

    def next_token(self):
        return int(np.argmax(self.logits()))

    def score_chunks(self, ids):
        assert len(ids) <= self.model.manifest["limits"]["score_chunk"]
        rows = []
        for t in ids:
            self.cache.append(t)
            rows.append(self.model.row(self.cache))
        self.passes += 1
        yield np.stack(rows)


def run(model, params, prompt, drafter=None, max_tokens=40, logprobs=0):
    s = model.session()
    evs = list(generate(s, Tok(), prompt, params, max_tokens=max_tokens, eog_ids=Tok.eog_ids, speculate=drafter,
                        logprobs=logprobs))
    return evs[-1], evs[:-1], s


PROMPTS = [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1], [4, 4, 4], [2], [1, 3, 1, 3, 2, 0, 1, 3, 1]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculation_is_plain_greedy(seed, prompt):
    model = MockModel(seed)
    plain, plain_evs, ps = run(model, GREEDY, prompt)
    for drafter in (NgramDrafter(), NgramDrafter(k=2), ModelDrafter(MockModel(seed + 100), 256, "other"),
                    ModelDrafter(model, 256, "self")):
        done, evs, s = run(model, GREEDY, prompt, drafter)
        assert done.ids == plain.ids and done.text == plain.text and done.finish_reason == plain.finish_reason
        assert [e.id for e in evs] == [e.id for e in plain_evs]
        t = done.timings
        assert t["accepted_tokens"] <= t["draft_tokens"] and t["speculate"] == drafter.name
        if drafter.name == "self" and t["draft_tokens"]:
            assert t["acceptance_rate"] == 1.0, t          # a model drafting for itself is always right
            assert s.passes < ps.passes, (s.passes, ps.passes)


def test_ngram_drafts_what_followed_the_last_occurrence():
    d = NgramDrafter(k=3)
    assert d.draft([7, 8, 9, 1, 7, 8], 3) == [9, 1, 7]          # "7 8" seen before, then 9 1 7
    assert d.draft([5, 1, 2, 6, 1, 2, 9, 1, 2], 2) == [9, 1]     # the latest occurrence wins
    assert d.draft([1, 2, 3], 3) == []                           # nothing repeats
    assert d.draft([4], 3) == []


def test_repetitive_output_is_accepted_mostly():
    model = MockModel(1, scale=6.0, eos_bias=-30.0)     # greedy on a (prev2, prev1) table ends in a cycle
    done, _, _ = run(model, GREEDY, PROMPTS[0], NgramDrafter(), max_tokens=60)
    assert done.timings["acceptance_rate"] is not None and done.timings["acceptance_rate"] > 0.5, done.timings


def exact_distribution(model, params, prompt, n):
    """P(first n generated ids) by enumeration, with the Sampler's own chain (temperature, top-k/p...)."""
    from runtime_py.sampling import Sampler
    sampler = Sampler(params)
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=n):
        p, hist = 1.0, list(prompt)
        for t in seq:
            order, w = sampler.candidates(model.row(hist), hist)
            q = dict(zip(order.tolist(), (w / w.sum()).tolist()))
            p *= q.get(t, 0.0)
            hist.append(t)
            if p == 0:
                break
        if p > 0:
            probs[seq] = p
    return probs


@pytest.mark.parametrize("params", [{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
                                    {"temperature": 0.7, "top_k": 3, "top_p": 0.9, "min_p": 0.05,
                                     "repeat_penalty": 1.3}])
def test_sampled_speculation_keeps_the_distribution(params):
    model, prompt, n, trials = MockModel(3, scale=1.5, eos_bias=-30.0), [0, 1, 0, 1, 0], 3, 3000
    want = exact_distribution(model, SamplingParams(**{**GREEDY.__dict__, **params}), prompt, n)
    got = {}
    for seed in range(trials):
        p = SamplingParams(**{**GREEDY.__dict__, **params, "seed": seed})
        done, _, _ = run(model, p, prompt, NgramDrafter(k=3), max_tokens=n)
        got[tuple(done.ids)] = got.get(tuple(done.ids), 0) + 1
    assert set(got) <= set(want)
    # total variation distance between the empirical and exact distributions; ~0.05 expected at 3000 trials
    tv = 0.5 * sum(abs(got.get(s, 0) / trials - q) for s, q in want.items())
    assert tv < 0.08, tv


def test_speculation_stops_like_plain_generation():
    model = MockModel(2)
    for params in (GREEDY, SamplingParams(**{**GREEDY.__dict__, "stop": ["c"]}),
                   SamplingParams(**{**GREEDY.__dict__, "temperature": 1.0, "seed": 4})):
        for max_tokens in (1, 2, 7):
            plain, _, _ = run(model, params, PROMPTS[0], max_tokens=max_tokens)
            done, _, _ = run(model, params, PROMPTS[0], NgramDrafter(), max_tokens=max_tokens)
            assert len(done.ids) <= max_tokens and done.finish_reason == plain.finish_reason
            if params.greedy:
                assert done.ids == plain.ids and done.text == plain.text


def test_logprobs_are_the_rows_of_the_chosen_tokens():
    model = MockModel(0)
    plain, pe, _ = run(model, GREEDY, PROMPTS[0], logprobs=2)
    done, de, _ = run(model, GREEDY, PROMPTS[0], NgramDrafter(), logprobs=2)
    assert [e.top_logprobs for e in de] == [e.top_logprobs for e in pe]


def test_usage_extension_reports_acceptance():
    from runtime_py.schemas import usage
    done, _, _ = run(MockModel(1, scale=6.0, eos_bias=-30.0), GREEDY, PROMPTS[0], NgramDrafter(), max_tokens=20)
    u = usage(10, len(done.ids), 0, done.timings)
    assert u["speculative"] == {k: done.timings[k] for k in ("draft_tokens", "accepted_tokens", "acceptance_rate")}
    assert "speculative" not in usage(10, 3, 0, {"decode_tok_s": 1.0})


def test_draft_length_follows_the_acceptance():
    from runtime_py.speculate import PASS_COST, DraftLength
    cpu = DraftLength(7, PASS_COST["cpu"])
    assert cpu.k() == 1                                   # prior 0.5: one draft pays on a CPU adapter, not more
    for _ in range(3):
        cpu.update(7, 7)
    assert cpu.k() == 7 and cpu.acceptance > 0.9          # everything accepted: the longest draft
    for _ in range(6):
        cpu.update(cpu.k() or 1, 0)
    assert cpu.k() == 0                                   # nothing accepted for a few passes: plain steps
    for _ in range(4):
        cpu.probe(True)                                   # the drafter's guesses start matching the plain steps
    assert cpu.k() > 0
    gpu = DraftLength(7, PASS_COST["gpu"])
    assert gpu.k() > 1                                    # a cheaper pass drafts more at the same acceptance


def test_adaptive_and_fixed_k_give_the_same_ids():
    model = MockModel(1, scale=6.0, eos_bias=-30.0)
    plain, _, _ = run(model, GREEDY, PROMPTS[0], max_tokens=40)
    for d in (NgramDrafter(k=7), NgramDrafter(k=7, adaptive=False)):
        done, _, _ = run(model, GREEDY, PROMPTS[0], d, max_tokens=40)
        assert done.ids == plain.ids and done.timings["passes"] < 40, done.timings
