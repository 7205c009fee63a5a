"""The decode loop: prefill the prompt, then choose / feed one token at a time until EOS, a stop string or the limit.
Mirrors web/generate.js step for step.

    for ev in generate(session, tok, prompt_ids, params, max_tokens=64): ...   # ev: Token, then one Done
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from compiler.errors import ContextOverflowError

from .gpu_sampling import LP_MAX, RING, gpu_reason
from .grammar import FINISH_GRAMMAR, constraint_for
from .sampling import Sampler, SamplingParams, top_logprobs
from .tokenizer import StreamDecoder

# several decode steps per submit when sampling runs on the GPU: the first token comes with the prefill's submit
# (time to first token does not grow), then 2, 4, 8, .. steps per submit up to RING, fewer when a step is slow so that
# text still streams about every STREAM_INTERVAL_S, but never fewer than MIN_STEPS (a submit + readback costs
# ~0.15 ms on lavapipe and ~0.2 ms on an H100: more than a small model's step on a real GPU)
STREAM_INTERVAL_S = 0.1
MIN_STEPS = 8


@dataclass
class Token:
    id: int
    text: str                                  # new text this token completes (may be "" mid UTF-8 / stop prefix)
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Done:
    ids: list[int]
    text: str
    finish_reason: str                         # "stop" (EOS, stop string, grammar complete) | "length" |
                                               # "grammar" (the grammar allows no further token)
    timings: dict = field(default_factory=dict)


class StopStrings:
    """Finds stop strings in streamed text; holds back a tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""       # all text so far
        self.emitted = 0     # chars released to the caller

    def feed(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        # the earliest stop wins, whichever string it is (one delta may complete several)
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0]
        if hits:
            i = min(hits)
            out = self.text[self.emitted:i]
            self.text, self.emitted = self.text[:i], i
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def generate(session, tokenizer, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int | None = None,
             logprobs: int = 0, eog_ids=(), should_stop=lambda: False):
    """Yields Token events then one Done. The session is reset to position 0 first (no prefix reuse yet).
    max_tokens overrides params.max_tokens; both None: until EOS, a stop string or the end of the context."""
    if not prompt_ids:
        raise ContextOverflowError("empty prompt: nothing to condition on")
    if len(prompt_ids) >= session.ctx:
        raise ContextOverflowError(f"prompt is {len(prompt_ids)} tokens but the context holds {session.ctx} "
                                   f"(use a shorter prompt or a larger --ctx)")
    room = session.ctx - len(prompt_ids)
    max_tokens = max_tokens if max_tokens is not None else params.max_tokens
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    sampler = Sampler(params)
    constraint = constraint_for(params, tokenizer)      # response_format / grammar / regex: a mask per step
    matcher = constraint.matcher() if constraint is not None else None
    fast_greedy = params.greedy and not logprobs and params.repeat_penalty == 1 \
        and not params.presence_penalty and not params.frequency_penalty and matcher is None   # masks: CPU path
    decoder, stops = StreamDecoder(tokenizer), StopStrings(params.stop)
    history, out_ids, text = list(prompt_ids), [], []
    eog = set(eog_ids)

    on_gpu = callable(getattr(session, "gpu_sampling", None)) and session.gpu_sampling() \
        and gpu_reason(params) is None and logprobs <= LP_MAX and matcher is None   # masks: CPU sampler
    t0 = time.perf_counter()
    session.reset()
    if on_gpu:
        gpu_tokens = _gpu_tokens(session, prompt_ids, params, logprobs, max_tokens)
    else:
        session.forward(prompt_ids)
    t_first = None
    finish, cut = "length", False
    while len(out_ids) < max_tokens:
        if on_gpu:
            tok, lp = next(gpu_tokens)
        elif fast_greedy:
            tok, lp = session.next_token(), None
        else:
            mask = matcher.mask() if matcher is not None else None
            if matcher is not None and mask is None:
                finish = FINISH_GRAMMAR
                break
            logits = session.logits()
            tok = sampler.sample(logits, history, mask)
            lp = top_logprobs(logits, logprobs) if logprobs else None
        if t_first is None:
            t_first = time.perf_counter()
        if tok in eog:
            finish = "stop"
            break
        if matcher is not None:
            matcher.consume(tok)
        out_ids.append(tok)
        history.append(tok)
        delta, cut = stops.feed(decoder.push(tok))
        text.append(delta)
        yield Token(tok, delta, lp)
        if cut or should_stop() or (matcher is not None and matcher.done):
            finish = "stop"
            break
        if len(out_ids) < max_tokens and not on_gpu:
            session.forward([tok])
    if not cut:   # release what was held back: an unfinished UTF-8 sequence, a possible stop-string prefix
        tail, cut = stops.feed(decoder.flush())
        tail += "" if cut else stops.flush()
        finish = "stop" if cut else finish
        if tail:
            text.append(tail)
            yield Token(-1, tail, None)   # id -1: text released at the end, no new token
    t_end = time.perf_counter()
    n = len(out_ids)
    timings = {
        "prompt_tokens": len(prompt_ids), "generated_tokens": n,
        "ttft_s": round((t_first or t_end) - t0, 4),
        "prefill_tok_s": round(len(prompt_ids) / max((t_first or t_end) - t0, 1e-9), 2),
        "decode_tok_s": round((n - 1) / (t_end - t_first), 2) if n > 1 and t_first else None,
        "total_s": round(t_end - t0, 4),
    }
    yield Done(out_ids, "".join(text), finish, timings)


def _gpu_tokens(session, prompt_ids: list[int], params: SamplingParams, logprobs: int, max_tokens: int):
    """Yields (id, top logprobs or None) sampled on the GPU, reading the ring once per submit. The caller stops at
    EOS / a stop string / the limit; tokens of the last submit past that are dropped (their KV entries are simply
    overwritten by the next sequence)."""
    session.begin_sampling(params, prompt_ids, logprobs)
    batch, made, n, target = session.prefill_sample(prompt_ids), 1, 1, RING
    while True:
        for tok, _, tops in batch:
            yield tok, tops if logprobs else None
        if made >= max_tokens:
            return
        n = min(2 * n, target, max_tokens - made)
        t = time.perf_counter()
        batch = session.decode_sample(n)
        step_s = (time.perf_counter() - t) / n
        target = min(RING, max(MIN_STEPS, int(STREAM_INTERVAL_S / max(step_s, 1e-9))))
        made += n
