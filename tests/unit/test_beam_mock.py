"""runtime_py/beam.py against brute force, on a mock model with a tiny vocabulary (V = 5, one or two EOS ids, depth
<= 4): every continuation's logits are a fixed random function of the sequence so far.

- with enough beams to keep every sequence, the result is the n best of *all* sequences (enumerated);
- with K = 2, 3 it is the definition run literally: the whole vocabulary per beam, sorted, cut to K, no early stop
  (the search's top-K-per-beam shortcut and its early stop must not change the result);
- K = 1 follows greedy decoding's path and (length_penalty 0) scores at least as well as greedy;
- the request check refuses what it cannot combine with beams, by name.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from compiler.errors import InvalidParameterError
from runtime_py.beam import BeamSearch, BeamSpec, beam_search, check_request, log_softmax, top_tokens

V = 5


def mock_logits(seed: int, eos_bias: float = 0.0):
    """seq (tuple of ids) -> (V,) float32 logits, deterministic per (seed, seq); id 0 (an EOS) shifted by eos_bias."""
    def f(seq):
        h = hashlib.sha256(repr((seed, tuple(seq))).encode()).digest()
        x = np.random.default_rng(int.from_bytes(h[:8], "little")).normal(0, 2, V).astype(np.float32)
        x[0] += eos_bias
        return x
    return f


class MockSource:
    """The logits source beam_search drives; records the forward passes it was asked for."""

    def __init__(self, f):
        self.f, self.seqs, self.calls = f, [()], 0

    def start(self):
        return [self.f(())]

    def advance(self, moves):
        self.seqs = [self.seqs[p] + (t,) for p, t in moves]
        self.calls += 1
        return [self.f(s) for s in self.seqs]


def score(cum, length, alpha):
    return cum / length ** alpha


def stop_lp(lp, eos):
    """log P(stop) = log of the summed probability of the EOS ids."""
    return float(np.log(np.exp(lp[list(eos)]).sum()))


def brute_force(f, depth, n, eos, alpha):
    """The n best of every hypothesis: a non-EOS prefix + EOS (length len + 1), or a non-EOS sequence of `depth`."""
    out = []
    for L in range(depth + 1):
        for seq in itertools.product([v for v in range(V) if v not in eos], repeat=L):
            cum = sum(log_softmax(f(seq[:i]))[seq[i]] for i in range(L))
            if L < depth:
                c = cum + stop_lp(log_softmax(f(seq)), eos)
                out.append((score(c, L + 1, alpha), list(seq), c, "stop"))
            else:
                out.append((score(cum, L, alpha), list(seq), cum, "length"))
    out.sort(key=lambda h: -h[0])
    return out[:n]


def literal(f, depth, width, n, eos, alpha):
    """The definition (runtime_py/beam.py docstring) step by step over the whole vocabulary, without early stop."""
    live, finished = [((), 0.0)], []
    for t in range(1, depth + 1):
        children = []
        for i, (seq, cum) in enumerate(live):
            lp = log_softmax(f(seq))
            c = cum + stop_lp(lp, eos)
            finished.append((score(c, t, alpha), list(seq), c, "stop"))
            children += [(cum + lp[v], i, v, seq + (v,)) for v in range(V) if v not in eos]
        children.sort(key=lambda c: (-c[0], c[1], c[2]))
        live = [(s, c) for c, _, _, s in children[:width]]
    finished += [(score(c, depth, alpha), list(s), c, "length") for s, c in live]
    finished.sort(key=lambda h: -h[0])          # stable: the earlier finished first among equal scores
    return finished[:n]


def check(got, want):
    assert [(h.ids, h.finish_reason) for h in got] == [(w[1], w[3]) for w in want]
    np.testing.assert_allclose([h.cum_logprob for h in got], [w[2] for w in want], rtol=0, atol=1e-9)
    np.testing.assert_allclose([h.score for h in got], [w[0] for w in want], rtol=0, atol=1e-9)


ALPHAS = [0.0, 1.0, 0.5, -0.5, 2.0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", ALPHAS)
def test_enough_beams_find_the_best_of_all_sequences(seed, alpha):
    eos = (0,) if seed % 2 else (0, 3)
    depth, n = 4, 3
    f = mock_logits(seed, eos_bias=-1.0 + seed % 3)
    width = (V - len(eos)) ** depth                  # every non-EOS sequence stays live
    got = beam_search(MockSource(f), width, depth, eos, n=n, length_penalty=alpha)
    check(got, brute_force(f, depth, n, eos, alpha))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("width,n", [(2, 2), (3, 3), (3, 1), (2, 1)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_k_beams_are_the_definition(seed, width, n, alpha):
    f = mock_logits(100 + seed, eos_bias=seed % 4 - 1.5)
    eos = (0,) if seed % 2 else (0, 3)
    src = MockSource(f)
    got = beam_search(src, width, 4, eos, n=n, length_penalty=alpha)
    check(got, literal(f, 4, width, n, eos, alpha))


def test_the_early_stop_happens_and_changes_nothing():
    """An EOS-heavy model: the search stops before max_tokens, with the literal definition's result."""
    stopped = 0
    for seed in range(10):
        f = mock_logits(200 + seed, eos_bias=4.0)
        for alpha in (0.0, 1.0):
            src = MockSource(f)
            got = beam_search(src, 2, 6, (0,), length_penalty=alpha)
            check(got, literal(f, 6, 2, 2, (0,), alpha))
            stopped += src.calls < 5
    assert stopped >= 10, stopped


def test_the_source_holds_the_beams_the_search_holds():
    f = mock_logits(7)
    src, search = MockSource(f), BeamSearch(3, 4, (0,))
    rows = src.start()
    while moves := search.step(rows):
        rows = src.advance(moves)
        assert [list(s) for s in src.seqs] == [b.ids for b in search.live]


@pytest.mark.parametrize("seed", range(10))
def test_one_beam_follows_greedy_and_scores_at_least_as_well(seed):
    """K = 1: the live beam is greedy decoding over the non-EOS tokens; the result is the best of that path's EOS
    exits and its end, so (length_penalty 0) its cum logprob is >= greedy decoding's (which stops at the first
    step whose argmax is EOS), with equality when no earlier exit is better."""
    f = mock_logits(300 + seed, eos_bias=0.5)
    path, exits, cum, greedy = [], [], 0.0, None
    while len(path) < 5:
        lp = log_softmax(f(tuple(path)))
        exits.append((cum + lp[0], list(path)))
        if greedy is None and int(np.argmax(lp)) == 0:
            greedy = cum + lp[0]
        lp[0] = -np.inf
        tok = int(np.argmax(lp))
        cum += lp[tok]
        path.append(tok)
    exits.append((cum, path))
    greedy = cum if greedy is None else greedy
    (h,) = beam_search(MockSource(f), 1, 5, (0,), length_penalty=0.0)
    best = max(exits, key=lambda e: e[0])
    assert h.ids == best[1] and abs(h.cum_logprob - best[0]) < 1e-9
    assert h.cum_logprob >= greedy - 1e-12


def test_logprobs_are_each_tokens_and_sum_to_the_cumulative_one():
    f = mock_logits(11)
    for h in beam_search(MockSource(f), 3, 4, (0,), logprobs=2):
        assert [t for t, _, _ in h.logprobs] == h.ids
        for i, (t, lp, tops) in enumerate(h.logprobs):
            row = log_softmax(f(tuple(h.ids[:i])))       # the model's own alternatives, EOS among them
            assert abs(lp - row[t]) < 1e-12 and [a for a, _ in tops] == list(np.argsort(-row, kind="stable")[:2])
        eos_lp = log_softmax(f(tuple(h.ids)))[0] if h.finish_reason == "stop" else 0.0
        assert abs(sum(lp for _, lp, _ in h.logprobs) + eos_lp - h.cum_logprob) < 1e-9


def test_top_tokens_is_a_stable_argsort_prefix():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.integers(-3, 3, rng.integers(1, 12)).astype(np.float64)   # many ties
        x[rng.random(len(x)) < 0.2] = -np.inf
        k = int(rng.integers(0, 14))
        want = [i for i in np.argsort(-x, kind="stable") if np.isfinite(x[i])][:k]
        assert top_tokens(x, k).tolist() == want


def test_search_arguments_are_checked():
    with pytest.raises(ValueError):
        BeamSearch(2, 4, n=3)
    with pytest.raises(ValueError):
        BeamSearch(2, 0)
    s = BeamSearch(2, 1)
    with pytest.raises(ValueError, match="rows of logits"):
        s.step([np.zeros(V), np.zeros(V)])
    assert s.step([np.zeros(V)]) == [] and len(s.result()) == 2


def test_request_check():
    assert check_request({"n": 2}) is None
    assert check_request({"use_beam_search": True}) == BeamSpec(1, 1, 1.0)
    assert check_request({"use_beam_search": True, "n": 3}) == BeamSpec(3, 3, 1.0)
    assert check_request({"use_beam_search": True, "n": 2, "best_of": 4, "length_penalty": 0,
                          "temperature": 0, "top_k": -1, "top_p": 1, "seed": 3}) == BeamSpec(4, 2, 0.0)
    refused = [({"length_penalty": 1.0}, "length_penalty"),
               ({"early_stopping": True}, "early_stopping"),
               ({"use_beam_search": True, "n": 3, "best_of": 2}, "n"),
               ({"use_beam_search": True, "n": 17}, "n"),
               ({"use_beam_search": True, "best_of": 0}, "best_of"),
               ({"use_beam_search": True, "n": True}, "n"),
               ({"use_beam_search": True, "length_penalty": float("nan")}, "length_penalty"),
               ({"use_beam_search": True, "length_penalty": "1"}, "length_penalty"),
               ({"use_beam_search": True, "early_stopping": False}, "early_stopping"),
               ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
               ({"use_beam_search": True, "top_p": 0.9}, "top_p"),
               ({"use_beam_search": True, "top_k": 40}, "top_k"),
               ({"use_beam_search": True, "min_p": 0.05}, "min_p"),
               ({"use_beam_search": True, "repetition_penalty": 1.1}, "repetition_penalty"),
               ({"use_beam_search": True, "presence_penalty": 0.5}, "presence_penalty"),
               ({"use_beam_search": True, "stop": ["\n"]}, "stop"),
               ({"use_beam_search": True, "grammar": "root ::= \"a\""}, "grammar"),
               ({"use_beam_search": True, "regex": "a+"}, "regex"),
               ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format")]
    for req, field in refused:
        with pytest.raises(InvalidParameterError) as e:
            check_request(req)
        assert e.value.param == field, (req, e.value.param)
    assert check_request({"use_beam_search": True, "response_format": {"type": "text"}, "stop": []}).width == 1
