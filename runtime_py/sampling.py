"""Next-token choice from logits. Mirrors web/sampler.js line for line, including the random generator, so the same
seed gives the same tokens natively and in the browser.

Order (llama.cpp's default chain): penalties -> top-k -> top-p -> min-p -> temperature -> draw.
top-p and min-p look at the untempered distribution, as llama.cpp does; temperature 0 means greedy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.errors import KilnError


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40             # <= 0: off
    top_p: float = 0.95         # 1: off
    min_p: float = 0.05         # 0: off
    repeat_penalty: float = 1.0  # 1: off; llama.cpp-style divide/multiply over the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit before penalties

    def validate(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise KilnError(msg)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


class Mulberry32:
    """Tiny 32-bit PRNG, chosen because JavaScript computes it bit-identically (Math.imul); see web/sampler.js."""

    def __init__(self, seed: int):
        self.a = seed & 0xFFFFFFFF

    def next(self) -> float:
        self.a = (self.a + 0x6D2B79F5) & 0xFFFFFFFF
        t = self.a
        t = _imul(t ^ (t >> 15), t | 1)
        t = (t + _imul(t ^ (t >> 7), t | 61)) & 0xFFFFFFFF ^ t
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296.0


def _imul(a: int, b: int) -> int:
    return (a * b) & 0xFFFFFFFF


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy & 0xFFFFFFFF)
        self.rng = Mulberry32(seed)

    def apply_penalties(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.p
        if p.logit_bias:   # added first, as llama.cpp's sampler chain does; ids outside the vocabulary are ignored
            logits = logits.copy()
            for tok, b in p.logit_bias.items():
                if 0 <= int(tok) < len(logits):
                    logits[int(tok)] += b
        recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else []
        if not recent or (p.repeat_penalty == 1 and not p.presence_penalty and not p.frequency_penalty):
            return logits
        logits = logits.copy()
        ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        sel = logits[ids]
        sel = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        sel -= counts * p.frequency_penalty + p.presence_penalty
        logits[ids] = sel
        return logits

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = self.apply_penalties(np.asarray(logits, dtype=np.float64), history)
        if p.greedy:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")                       # candidates, best first
        if p.top_k > 0:
            order = order[:p.top_k]
        cand = logits[order]
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1   # smallest prefix with mass >= top_p
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0:
            keep = int(np.count_nonzero(probs >= p.min_p * probs[0]))
            order, cand = order[:keep], cand[:keep]
        w = np.exp((cand - cand[0]) / p.temperature)
        cdf = np.cumsum(w)
        r = self.rng.next() * cdf[-1]
        return int(order[min(int(np.searchsorted(cdf, r, side="right")), len(order) - 1)])


def top_logprobs(logits: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """The model's own top-k (token id, log-probability), before any sampling adjustment (as OpenAI reports)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    idx = np.argsort(-x, kind="stable")[:k]   # ties in index order, as web/sampler.js
    return [(int(i), float(x[i] - lse)) for i in idx]
