"""Sampling semantics on small hand-made logit vectors (runtime_py/sampling.py), the seeded generator the browser
mirrors (web/sampler.js), and stop-string streaming (runtime_py/generate.py). No GPU: generate() runs on a fake
session that replays scripted logits."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import ContextOverflowError, InvalidParameterError, KilnError
from runtime_py.generate import Done, StopStrings, Token, generate
from runtime_py.sampling import GREEDY, Mulberry32, Sampler, SamplingParams, top_logprobs

ROOT = Path(__file__).resolve().parents[2]


def params(**kw) -> SamplingParams:
    """Everything off except what the test sets (temperature 1, no top-k/top-p/min-p, no penalties)."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1234)
    return SamplingParams(**{**base, **kw})


def draws(p: SamplingParams, logits, n: int, history=()) -> Counter:
    s = Sampler(p)
    return Counter(s.sample(np.asarray(logits, dtype=np.float32), list(history)) for _ in range(n))


# -- filters and temperature ------------------------------------------------------------------------------------
LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 2.9, 0.0], dtype=np.float32)   # argmax 1, runner-up 4 (close)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_argmax(seed):
    assert set(draws(params(top_k=1, temperature=1.5, seed=seed), LOGITS, 200)) == {1}


@pytest.mark.parametrize("seed", range(5))
def test_tiny_top_p_is_argmax(seed):
    assert set(draws(params(top_p=1e-6, temperature=2.0, seed=seed), LOGITS, 200)) == {1}


def test_temperature_zero_is_greedy_whatever_the_seed():
    for seed in (None, 0, 7):
        s = Sampler(params(temperature=0.0, top_k=40, top_p=0.5, min_p=0.3, seed=seed))
        assert all(s.sample(LOGITS, []) == 1 for _ in range(20))
    assert GREEDY.greedy and Sampler(GREEDY).sample(LOGITS, []) == 1


def test_top_k_keeps_the_k_best():
    got = draws(params(top_k=3, temperature=5.0), LOGITS, 3000)
    assert set(got) == {1, 4, 2}      # the three largest logits, each drawn at such a high temperature


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(params(top_p=0.75), logits, 3000)) == {0, 1}            # 0.5 < 0.75 <= 0.8
    assert set(draws(params(top_p=0.85), logits, 3000)) == {0, 1, 2}         # 0.8 < 0.85 <= 0.95
    assert set(draws(params(top_p=1.0), logits, 3000)) == {0, 1, 2, 3}      # off


def test_min_p_filters_relative_to_the_best():
    logits = np.log(np.array([0.40, 0.30, 0.19, 0.11]))
    # min_p 0.5: keep p >= 0.5 * 0.40 = 0.20 -> {0, 1}; min_p 0.25: keep p >= 0.10 -> all four
    assert set(draws(params(min_p=0.5), logits, 3000)) == {0, 1}
    assert set(draws(params(min_p=0.25), logits, 3000)) == {0, 1, 2, 3}
    assert set(draws(params(min_p=1.0), logits, 500)) == {0}


def test_unfiltered_draws_follow_the_softmax():
    probs = np.array([0.5, 0.3, 0.2])
    got = draws(params(), np.log(probs), 20000)
    freq = np.array([got[i] for i in range(3)]) / 20000
    assert np.abs(freq - probs).max() < 0.02, freq


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    cold, hot = draws(params(temperature=0.3), logits, 4000), draws(params(temperature=3.0), logits, 4000)
    assert cold[0] / 4000 > 0.8          # 0.5^(1/0.3) normalised: ~0.84
    assert 0.35 < hot[0] / 4000 < 0.45   # ~0.39
    assert hot[2] > 4 * cold[2]


# -- penalties --------------------------------------------------------------------------------------------------
def test_repeat_penalty_divides_positive_multiplies_negative_only_for_seen_tokens():
    s = Sampler(params(repeat_penalty=2.0))
    out = s.apply_penalties(np.array([2.0, -2.0, 1.0, 0.5]), [0, 1, 1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])


def test_presence_and_frequency_penalties():
    s = Sampler(params(presence_penalty=0.25, frequency_penalty=0.5))
    out = s.apply_penalties(np.array([2.0, -2.0, 1.0, 0.5]), [0, 1, 1])
    # token 0 seen once: 2 - 0.5 - 0.25; token 1 seen twice: -2 - 1.0 - 0.25; unseen tokens unchanged
    np.testing.assert_allclose(out, [1.25, -3.25, 1.0, 0.5])


def test_penalties_look_only_at_the_last_repeat_last_n_tokens():
    s = Sampler(params(repeat_penalty=2.0, repeat_last_n=1))
    np.testing.assert_allclose(s.apply_penalties(np.array([2.0, 2.0, 2.0]), [0, 1]), [2.0, 1.0, 2.0])
    s = Sampler(params(repeat_penalty=2.0, repeat_last_n=0))          # 0: off
    np.testing.assert_allclose(s.apply_penalties(np.array([2.0, 2.0]), [0, 1]), [2.0, 2.0])
    s = Sampler(params(repeat_penalty=2.0, repeat_last_n=5))          # window longer than the history: all of it
    np.testing.assert_allclose(s.apply_penalties(np.array([2.0, 2.0, 2.0, 2.0]), [0, 1, 2]), [1.0, 1.0, 1.0, 2.0])


def test_penalties_do_not_modify_the_callers_logits():
    logits = np.array([2.0, 1.0])
    Sampler(params(repeat_penalty=3.0)).apply_penalties(logits, [0])
    np.testing.assert_array_equal(logits, [2.0, 1.0])


def test_repeat_penalty_changes_the_greedy_choice():
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    assert Sampler(params(temperature=0.0)).sample(logits, [0]) == 0
    assert Sampler(params(temperature=0.0, repeat_penalty=1.1)).sample(logits, [0]) == 1     # 3 / 1.1 < 2.9
    assert Sampler(params(temperature=0.0, presence_penalty=0.2)).sample(logits, [0]) == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=2.0), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
])
def test_invalid_values_are_refused(kw, msg):
    with pytest.raises(KilnError, match=msg):
        Sampler(params(**kw))


# -- the seeded generator ---------------------------------------------------------------------------------------
# First outputs of web/sampler.js `new Mulberry32(seed).next()` (computed with node): the browser and the native
# runtime must draw the same numbers for the same seed.
MULBERRY32_JS = {
    42: [0.6011037519201636, 0.44829055899754167, 0.8524657934904099, 0.6697340414393693, 0.17481389874592423,
         0.5265925421845168],
    0: [0.26642920868471265, 0.0003297457005828619, 0.2232720274478197, 0.1462021479383111, 0.46732782293111086,
        0.5450490827206522],
    4294967295: [0.8964226141106337, 0.189478256739676, 0.7156526781618595, 0.9440599093213677, 0.8452364315744489,
                 0.5391399988438934],
}


def mulberry32_reference(seed: int, n: int) -> list[float]:
    """Independent transcription of the published mulberry32 (Tommy Ettinger), with JS's uint32 semantics spelled
    out through numpy: Math.imul = wrapping uint32 multiply, `>>>` = logical shift."""
    u32 = np.uint32
    out, state = [], u32(seed % 2**32)
    with np.errstate(over="ignore"):
        for _ in range(n):
            state = u32(state + u32(0x6D2B79F5))
            t = state
            t = u32(u32(t ^ (t >> u32(15))) * u32(t | u32(1)))
            t = u32(t ^ u32(t + u32(u32(t ^ (t >> u32(7))) * u32(t | u32(61)))))
            out.append(int(t ^ (t >> u32(14))) / 4294967296.0)
    return out


@pytest.mark.parametrize("seed", sorted(MULBERRY32_JS))
def test_mulberry32_pinned_values(seed):
    r = Mulberry32(seed)
    ours = [r.next() for _ in range(6)]
    assert ours == MULBERRY32_JS[seed]
    assert mulberry32_reference(seed, 6) == MULBERRY32_JS[seed]


def test_mulberry32_long_run_matches_reference_and_is_uniform():
    r = Mulberry32(42)
    ours = [r.next() for _ in range(2000)]
    assert ours == mulberry32_reference(42, 2000)
    assert all(0.0 <= x < 1.0 for x in ours)
    assert abs(np.mean(ours) - 0.5) < 0.03


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_mulberry32_matches_web_sampler_js(tmp_path):
    script = tmp_path / "mb.mjs"
    script.write_text(f'import {{ Mulberry32 }} from "{(ROOT / "web" / "sampler.js").as_uri()}";\n'
                      'const r = new Mulberry32(42); const out = [];\n'
                      'for (let i = 0; i < 50; i++) out.push(r.next());\n'
                      'console.log(JSON.stringify(out));\n')
    js = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True,
                                   timeout=60).stdout)
    r = Mulberry32(42)
    assert [r.next() for _ in range(50)] == js


def test_draw_uses_the_generator_as_documented():
    # flat logits, no filters: the cdf is [1, 2, 3, 4], so each draw is floor(4 u) for the generator's next u
    s = Sampler(params(seed=42))
    got = [s.sample(np.zeros(4, np.float32), []) for _ in range(6)]
    assert got == [int(4 * u) for u in MULBERRY32_JS[42]] == [2, 1, 3, 2, 0, 2]


def test_same_seed_same_draws_different_seed_different_draws():
    logits = np.zeros(50, np.float32)
    a = [Sampler(params(seed=7)).sample(logits, []) for _ in range(1)]
    s1, s2, s3 = Sampler(params(seed=7)), Sampler(params(seed=7)), Sampler(params(seed=8))
    seq1 = [s1.sample(logits, []) for _ in range(20)]
    assert seq1 == [s2.sample(logits, []) for _ in range(20)]
    assert seq1 != [s3.sample(logits, []) for _ in range(20)]
    assert a[0] == seq1[0]


def test_unseeded_sampler_still_samples():
    got = draws(params(seed=None), np.zeros(8, np.float32), 400)
    assert len(got) > 4


def test_top_logprobs_sorted_normalised_and_first_is_argmax():
    top = top_logprobs(LOGITS, 5)
    assert [i for i, _ in top] == [1, 4, 2, 0, 5]
    lps = [lp for _, lp in top]
    assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    full = LOGITS.astype(np.float64) - np.log(np.exp(LOGITS.astype(np.float64)).sum())
    np.testing.assert_allclose(lps, full[[1, 4, 2, 0, 5]], rtol=1e-12)


# -- stop strings -----------------------------------------------------------------------------------------------
def stream(stops, deltas):
    """(emitted pieces, stopped) feeding deltas until a stop; flush at the end if none."""
    ss, out = StopStrings(stops), []
    for d in deltas:
        piece, cut = ss.feed(d)
        out.append(piece)
        if cut:
            return out, True
    out.append(ss.flush())
    return out, False


def test_stop_inside_one_delta():
    assert stream(["STOP"], ["foo STOP bar"]) == (["foo "], True)


def test_stop_spanning_deltas_is_held_back_then_cut():
    out, cut = stream(["STOP"], ["foo S", "T", "O", "P bar"])
    assert cut and "".join(out) == "foo "
    assert out[0] == "foo "            # "S" could start the stop string: held back
    assert out[1:] == ["", "", ""]     # never emits a stop prefix


def test_partial_prefix_is_released_once_it_cannot_be_a_stop():
    ss = StopStrings(["</s>"])
    assert ss.feed("abc<") == ("abc", False)
    assert ss.feed("/") == ("", False)
    assert ss.feed("x") == ("</x", False)
    assert ss.feed("y</s>zz") == ("y", True)


def test_held_prefix_is_released_by_flush_when_the_stream_ends():
    assert stream(["\n\n"], ["Paris.", "\n"]) == (["Paris.", "", "\n"], False)


def test_no_stops_passes_everything_through():
    assert stream([], ["a", "b"]) == (["a", "b", ""], False)
    assert stream([""], ["a", "b"]) == (["a", "b", ""], False)   # empty stop strings are ignored


def test_earliest_of_several_stops_wins():
    # "b" is listed first but "a" occurs first: nothing at or past "a" may be emitted
    assert stream(["b", "a"], ["xab"]) == (["x"], True)
    assert stream(["lo wor", "o"], ["hel", "lo world"]) == (["he", "l"], True)   # "l" held: could start "lo wor"


@pytest.mark.parametrize("stops", [["."], ["\n\n"], ["answer is"], [" Paris", "."], ["zzz"], ["is:", "\n"]])
def test_stop_streaming_never_passes_a_stop_any_chunking(stops):
    text = " Paris.\n\nThe answer is: 42"
    first = min((text.find(s) for s in stops if s in text), default=len(text))
    for size in (1, 2, 3, 5, len(text)):
        out, cut = stream(stops, [text[i:i + size] for i in range(0, len(text), size)])
        assert "".join(out) == text[:first], (stops, size)
        assert cut == (first < len(text))


# -- generate() on a fake session: stop / length / EOS bookkeeping ----------------------------------------------
class FakeTokenizer:
    """ids are characters: decode = join."""
    VOCAB = list(" abcdefghijklmnopqrstuvwxyz.!\n") + ["<eos>"]
    EOS = len(VOCAB) - 1

    def decode(self, ids, skip_special=False):
        return "".join("" if (skip_special and i == self.EOS) else self.VOCAB[i] for i in ids)

    def encode(self, text):
        return [self.VOCAB.index(c) for c in text]


class FakeSession:
    """Replays `script` (token ids) as one-hot logits, one per forward."""

    def __init__(self, script, ctx=64):
        self.script, self.ctx, self.pos, self.forwards = script, ctx, 0, []
        self.held, self.chunk = [], 8           # what runtime_py/kvcache.py reads (runtime_py/model.py Session)

    def reset(self, pos=0):
        self.pos = pos
        del self.held[pos:]

    def forward(self, ids):
        if self.pos + len(ids) > self.ctx:
            raise ContextOverflowError("overflow")
        self.forwards.append(list(ids))
        self.pos += len(ids)
        self.held.extend(ids)

    def logits(self):
        step = len(self.forwards) - 1
        x = np.full(len(FakeTokenizer.VOCAB), -10.0, np.float32)
        x[self.script[step] if step < len(self.script) else FakeTokenizer.EOS] = 10.0
        return x

    def next_token(self):
        return int(np.argmax(self.logits()))


def run_generate(text, stops=(), max_tokens=64, logprobs=0, ctx=64, prompt="ab"):
    tok = FakeTokenizer()
    sess = FakeSession(tok.encode(text), ctx=ctx)
    evs = list(generate(sess, tok, tok.encode(prompt), params(temperature=0.0, stop=list(stops)),
                        max_tokens=max_tokens, logprobs=logprobs, eog_ids=[tok.EOS]))
    assert isinstance(evs[-1], Done) and all(isinstance(e, Token) for e in evs[:-1])
    return evs[:-1], evs[-1], sess


def test_generate_stops_at_eos():
    toks, done, _ = run_generate("hello")
    assert done.text == "hello" and done.finish_reason == "stop" and len(done.ids) == 5


def test_generate_max_tokens_is_length():
    toks, done, _ = run_generate("hello world", max_tokens=4)
    assert done.text == "hell" and done.ids == FakeTokenizer().encode("hell") and done.finish_reason == "length"


def test_generate_stop_string_truncates_and_streams_nothing_past_it():
    toks, done, _ = run_generate("hello. world", stops=["."])
    assert done.text == "hello" and done.finish_reason == "stop"
    assert "".join(t.text for t in toks) == done.text
    toks, done, _ = run_generate("say lo wor", stops=["lo wor", "y l"])
    assert done.text == "sa" and "".join(t.text for t in toks) == "sa"


def test_generate_releases_a_held_prefix_at_the_end():
    toks, done, _ = run_generate("abc.", stops=[".!"])     # "." held back as a possible ".!", then released
    assert done.text == "abc." and "".join(t.text for t in toks) == "abc."
    assert toks[-1].id == -1 and toks[-1].text == "."


def test_generate_logprobs_and_context_bound():
    toks, done, sess = run_generate("abcdefgh", logprobs=3, ctx=6, prompt="ab")
    assert len(done.ids) == 4 and done.finish_reason == "length"       # ctx 6 - 2 prompt tokens
    assert all(t.top_logprobs and t.top_logprobs[0][0] == t.id for t in toks)
    assert sess.pos <= sess.ctx


def test_generate_refuses_a_prompt_as_long_as_the_context():
    tok = FakeTokenizer()
    with pytest.raises(ContextOverflowError, match="prompt is 8 tokens but the context holds 8"):
        next(generate(FakeSession([], ctx=8), tok, tok.encode("abcdefgh"), GREEDY))
    with pytest.raises(ContextOverflowError, match="empty prompt"):
        next(generate(FakeSession([], ctx=8), tok, [], GREEDY))


# -- the request table: SamplingParams.from_request (web/sampler.js fromRequest: tests/e2e/test_mirrors.py) ------
def test_from_request_defaults_are_the_dataclass_defaults():
    assert SamplingParams.from_request({}) == SamplingParams()
    ignored = {"temperature": None, "stop": None, "model": "x", "user": "u"}     # null = absent; others not ours
    assert SamplingParams.from_request(ignored) == SamplingParams()
    assert SamplingParams().max_tokens is None       # until EOS, a stop string or the end of the context


def test_from_request_top_p_zero_is_the_most_likely_token():
    p = SamplingParams.from_request({"top_p": 0, "top_k": 50, "temperature": 1.5})
    assert (p.top_p, p.top_k) == (1.0, 1)
    assert set(draws(p, LOGITS, 200)) == {1}


def test_from_request_aliases_agree_or_are_refused():
    assert SamplingParams.from_request({"repetition_penalty": 1.2}).repeat_penalty == 1.2
    assert SamplingParams.from_request({"repeat_penalty": 1.2}).repeat_penalty == 1.2
    assert SamplingParams.from_request({"repeat_penalty": 1.2, "repetition_penalty": 1.2}).repeat_penalty == 1.2
    with pytest.raises(InvalidParameterError, match="repetition_penalty and repeat_penalty") as e:
        SamplingParams.from_request({"repeat_penalty": 1.2, "repetition_penalty": 1.1})
    assert e.value.param == "repeat_penalty"
    assert SamplingParams.from_request({"max_completion_tokens": 7}).max_tokens == 7
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams.from_request({"max_tokens": 7, "max_completion_tokens": 8})
    assert e.value.param == "max_completion_tokens"


@pytest.mark.parametrize("req, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 1.01}, "top_p"), ({"top_k": 1.5}, "top_k"), ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"), ({"stop": 5}, "stop"), ({"stop": ["a", 1]}, "stop"), ({"stop": list("abcde")}, "stop"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_from_request_refuses_naming_the_field_as_given(req, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams.from_request(req)
    assert e.value.param == param and str(e.value).startswith(param)


def test_from_request_normalises_types():
    p = SamplingParams.from_request({"top_k": 3.0, "stop": "\n", "seed": -5, "repeat_last_n": -1})
    assert p.top_k == 3 and isinstance(p.top_k, int) and p.stop == ["\n"] and p.seed == -5 and p.repeat_last_n == -1


def test_repeat_last_n_minus_one_penalises_the_whole_history():
    s = Sampler(params(repeat_penalty=2.0, repeat_last_n=-1))
    np.testing.assert_allclose(s.apply_penalties(np.array([2.0, 2.0, 2.0]), [0, 1] + [2] * 100), [1.0, 1.0, 1.0])


def test_cli_sampling_defaults_are_sampling_params():
    from runtime_py.cli import _sampling, parser
    a = parser().parse_args(["run", "--prompt", "hi"])
    assert _sampling(a) == SamplingParams()
