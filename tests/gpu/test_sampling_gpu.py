"""The GPU sampler (sample_prep -> sample_topk -> sample_draw) against the numpy reference runtime_py/sampling.py
with the same Mulberry32 numbers: exact top-k with ties by index, penalties over the GPU-held history, logit bias,
top-p on and just past an exact boundary, min-p 0 and 1, greedy, and random logits at many seeds. The GPU works in
float32 and the reference in float64, so on random logits a draw that falls within float32 rounding of a boundary
could differ; such cases are detected from the reference's own numbers and excluded (and counted)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from compiler.kernels import SampleDraw, SamplePrep, SampleTopK
from runtime_py.device import NoAdapterError, get_device
from runtime_py.gpu_sampling import K_MAX, LP_MAX, pack_config
from runtime_py.sampling import Mulberry32, Sampler, SamplingParams, top_logprobs

try:
    from .kernel_harness import run_kernel
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

f32 = np.float32
RING = 4


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def gpu_sample(logits, history, params: SamplingParams, seed: int, n_logprobs=0, step=1):
    """One token through the three kernels as the sample program chains them; (token, rng state, logprob, tops)."""
    n = len(logits)
    cfg = np.frombuffer(pack_config(params, n_logprobs), np.uint32).copy()
    hist = np.zeros(len(history) + 4, np.uint32)
    hist[:len(history)] = history
    logits = np.asarray(logits, f32)
    state = np.array([seed, 0, 0, 0], np.uint32)
    # the sampled token's position: history holds pos0 + n_tokens tokens (here a 1-token forward at len - 1)
    pos0 = len(history) - 1
    logits_s, state = run_kernel(SamplePrep(), dict(n=n), [cfg, hist, logits, np.zeros(n, f32), state], [1, 1, 1],
                                 n_tokens=1, pos0=pos0)
    cand = np.zeros(4 * K_MAX, np.uint32)
    (cand,) = run_kernel(SampleTopK(), dict(n=n, mode=0), [cfg, logits_s, cand], [1, 1, 1])
    (cand,) = run_kernel(SampleTopK(), dict(n=n, mode=1), [cfg, logits, cand], [1, 1, 1])
    ring = np.full(2 * RING + RING * LP_MAX * 2, 0xDEADBEEF, np.uint32)
    tokens = np.array([99, 98, 97, 96], np.uint32)
    state, hist2, tokens, ring = run_kernel(SampleDraw(), dict(n=n, ring=RING),
                                            [cfg, logits, state, cand, hist, tokens, ring], [1, 1, 1],
                                            n_tokens=1, pos0=pos0)
    tok = int(tokens[0])
    assert (tokens[1:] == [98, 97, 96]).all()
    assert int(hist2[len(history)]) == tok, "history[pos + 1] = token"
    assert (hist2[:len(history)] == history).all()
    slot = 0   # the harness's State.step is 0
    assert int(ring[slot]) == tok
    lp = float(ring[RING + slot:RING + slot + 1].view(f32)[0])
    pairs = ring[2 * RING:].reshape(RING, LP_MAX, 2)[slot, :n_logprobs]
    tops = [(int(i), float(np.array(v, np.uint32).view(f32))) for i, v in pairs]
    return tok, int(state[0]), lp, tops


def margin_ok(logits, history, params, seed) -> bool:
    """False when the reference's draw or top-p cut lies within float32 rounding of a boundary."""
    s = Sampler(params)
    x = s.apply_penalties(np.asarray(logits, np.float64), history)
    if params.greedy:
        top2 = np.sort(x)[-2:]
        return top2[1] - top2[0] > 1e-5 or top2[1] == top2[0]
    order = np.argsort(-x, kind="stable")[:params.top_k]
    cand = x[order]
    probs = np.exp(cand - cand[0])
    probs /= probs.sum()
    cum = np.cumsum(probs)
    if params.top_p < 1 and np.min(np.abs(cum - params.top_p)) < 1e-5:
        return False
    keep = int(np.searchsorted(cum, params.top_p)) + 1 if params.top_p < 1 else len(order)
    cand, probs = cand[:keep], probs[:keep]
    if params.min_p > 0 and np.min(np.abs(probs - params.min_p * probs[0]) / probs[0]) < 1e-5 \
            and not (probs == probs[0]).all():
        return False
    if params.min_p > 0:
        cand = cand[:int(np.count_nonzero(probs >= params.min_p * probs[0]))]
    cdf = np.cumsum(np.exp((cand - cand[0]) / params.temperature))
    r = Mulberry32(seed).next() * cdf[-1]
    return bool(np.min(np.abs(cdf - r)) > 1e-5 * cdf[-1])


def check(logits, history, params, seed, n_logprobs=0):
    want = Sampler(SamplingParams(**{**params.__dict__, "seed": seed})).sample(np.asarray(logits), list(history))
    got, state, lp, tops = gpu_sample(logits, history, params, seed, n_logprobs)
    ref_rng = Mulberry32(seed)
    if not params.greedy:
        ref_rng.next()
    assert state == ref_rng.a, "the PRNG advances once per sampled token (never when greedy)"
    assert got == want, f"GPU picked {got}, reference {want} (seed {seed}, {params})"
    x = np.asarray(logits, np.float64)
    lse = x.max() + np.log(np.exp(x - x.max()).sum())
    assert abs(lp - (x[got] - lse)) < 1e-4, "the chosen token's logprob (raw logits)"
    if n_logprobs:
        ref = top_logprobs(logits, n_logprobs)
        assert [i for i, _ in tops] == [i for i, _ in ref]
        np.testing.assert_allclose([v for _, v in tops], [v for _, v in ref], atol=1e-4)
    return got


# -- top-k: exact, ties by index --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (300, 64), (1000, 40), (49152, 40), (262144, 64), (50, 64)])
def test_topk_exact_with_ties(n, k, rng):
    x = rng.integers(-20, 20, n).astype(f32) * 0.5       # many exact ties
    x[rng.integers(0, n, 3)] = -0.0
    cfg = np.frombuffer(pack_config(SamplingParams(top_k=k), 0), np.uint32).copy()
    (cand,) = run_kernel(SampleTopK(), dict(n=n, mode=0), [cfg, x, np.zeros(4 * K_MAX, np.uint32)], [1, 1, 1])
    kk = min(k, n)
    want = np.argsort(-x.astype(np.float64), kind="stable")[:kk]
    assert cand[:kk].tolist() == want.tolist()
    assert np.array_equal(cand[K_MAX:K_MAX + kk].view(f32), x[want])


def test_topk_negative_and_huge(rng):
    x = np.concatenate([-np.abs(rng.standard_normal(500)) * 1e30, [-np.inf, np.inf, 3.4e38]]).astype(f32)
    cfg = np.frombuffer(pack_config(SamplingParams(top_k=10), 0), np.uint32).copy()
    (cand,) = run_kernel(SampleTopK(), dict(n=len(x), mode=0), [cfg, x, np.zeros(4 * K_MAX, np.uint32)], [1, 1, 1])
    assert cand[:10].tolist() == np.argsort(-x.astype(np.float64), kind="stable")[:10].tolist()


# -- the whole sampler against the reference ----------------------------------------------------------------------
CASES = [
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.3, top_k=64, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.2, repeat_penalty=1.3, repeat_last_n=16),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.99, min_p=0.0, presence_penalty=0.5, frequency_penalty=0.7),
    SamplingParams(temperature=0.8, top_k=30, top_p=1.0, min_p=0.0, logit_bias={3: 2.5, 17: -100.0, 999: 1.0}),
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.5),   # greedy with a penalty
    SamplingParams(temperature=0.6, top_k=10, top_p=1.0, min_p=0.0, repeat_penalty=1.2, repeat_last_n=-1),  # all
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("n", [1000, 49152])
def test_sampler_equals_reference(case, n, rng):
    params = CASES[case]
    logits = (rng.standard_normal(n) * 3).astype(f32)
    history = rng.integers(0, 60, 40).tolist()            # repeats: counts > 1
    logits[history[:10]] += 6                              # penalised ids among the candidates
    seeds = [1, 2, 3, 12345, 0xFFFFFFFF, 7, 99, 2024]
    checked = 0
    for seed in seeds:
        if margin_ok(logits, history, params, seed):
            check(logits, history, params, seed, n_logprobs=5 if seed == 1 else 0)
            checked += 1
    assert checked >= len(seeds) - 1, "too many draws within float32 rounding of a boundary"


def test_top_p_exact_boundary():
    # four equal logits: probabilities exactly 0.25, cumulative sums exactly 0.25, 0.5, 0.75, 1
    logits = np.array([-5, 2, 2, -5, 2, 2, -9], f32)
    for top_p, allowed in [(0.5, {1, 2}), (0.5000001, {1, 2, 4}), (0.4999999, {1, 2}), (0.25, {1}), (0.75, {1, 2, 4})]:
        got = set()
        for seed in range(40):
            p = SamplingParams(temperature=1.0, top_k=4, top_p=top_p, min_p=0.0)   # the four 2s
            got.add(check(logits, [0], p, seed))
        assert got == allowed, (top_p, got)


def test_min_p_zero_and_one():
    logits = np.array([1.0, 3.0, 3.0, 2.9, -1.0], f32)
    for seed in range(30):   # min_p = 1: only the tied best survive
        assert check(logits, [0], SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=1.0), seed) in (1, 2)
    seen = {check(logits, [0], SamplingParams(temperature=5.0, top_k=5, top_p=1.0, min_p=0.0), s) for s in range(60)}
    assert seen == {0, 1, 2, 3, 4}, "min_p = 0 (off) keeps every candidate"


def test_greedy_ties_first_index():
    logits = np.zeros(5000, f32)
    logits[[4000, 17, 3000]] = 2.0
    assert check(logits, [1], SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0), 5) == 17


def test_penalty_window_from_the_history():
    logits = np.array([5.0, 4.9, -1.0, 0.5], f32)
    p = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0, repeat_last_n=3)
    assert check(logits, [2, 0, 3], p, 1) == 1   # 0 in the window: 5/2 < 4.9
    assert check(logits, [0, 2, 3, 3], p, 1) == 0   # 0 just outside the window
