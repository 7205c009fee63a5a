"""Next-token choice from logits. Mirrors web/sampler.js line for line, including the random generator, so the same
seed gives the same tokens natively and in the browser.

Order (llama.cpp's default chain): penalties -> top-k -> top-p -> min-p -> temperature -> draw.
top-p and min-p look at the untempered distribution, as llama.cpp does; temperature 0 means greedy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from compiler.errors import InvalidParameterError


# The request table: OpenAI / llama.cpp request fields -> SamplingParams, shared by `kiln serve` (runtime_py/api.py),
# the browser API (web/api.js) and, for its defaults, `kiln run`. web/sampler.js holds the same table (REQUEST_TABLE,
# compared by tests/e2e/test_mirrors.py); `from_request` / `fromRequest` implement it identically.
#
#   field              request names (aliases)         type          default  valid                 meaning
#   temperature        temperature                     number        0.7      [0, 2] (*)            0 = greedy
#   top_k              top_k                           integer       40       any                   <= 0: off
#   top_p              top_p                           number        0.95     [0, 1] (*)            1: off; 0 = top_k 1
#   min_p              min_p                           number        0.05     [0, 1]                0: off
#   repeat_penalty     repetition_penalty,             number        1.0      > 0                   1: off
#                      repeat_penalty
#   repeat_last_n      repeat_last_n                   integer       64       >= -1                 0: off; -1: all
#   presence_penalty   presence_penalty                number        0.0      [-2, 2]
#   frequency_penalty  frequency_penalty               number        0.0      [-2, 2]
#   seed               seed                            integer|null  null     any integer           null: random;
#                                                                                                   used mod 2**32
#   stop               stop                            string|list   []       <= 4 strings (*)      "" ignored
#   max_tokens         max_tokens,                     integer|null  null     >= 1                  null: until EOS,
#                      max_completion_tokens                                                        a stop or ctx end
#   response_format    response_format                 object|null   null     type text,            constrained
#                                                                             json_object or        output, see
#                                                                             json_schema (+ schema) runtime_py/
#   grammar            grammar                         string|null   null     GBNF (llama.cpp's)    grammar.py;
#   regex              regex                           string|null   null     a regular expression  at most one
#
# (*) request-only rules, OpenAI's: temperature <= 2, top_p 0 accepted (becomes top_k 1, top_p 1: only the most
# likely token, as OpenAI and llama.cpp do), at most 4 stop strings. SamplingParams itself (what `kiln run` flags
# build) keeps temperature >= 0 and top_p in (0, 1].
# Absent and null fields keep the default. Aliases must agree when several are given (a conflict is refused, not
# resolved by an order nobody can guess). Types are strict: true is not a number, "0.5" is not a number, 1.5 is not
# an integer (2.0 is 2, as in JavaScript). Every refusal is an InvalidParameterError naming the request field.
REQUEST_TABLE = [
    {"field": "temperature", "names": ["temperature"], "type": "number", "min": 0, "max": None, "request_max": 2},
    {"field": "top_k", "names": ["top_k"], "type": "integer", "min": None, "max": None},
    {"field": "top_p", "names": ["top_p"], "type": "number", "min": 0, "max": 1, "min_open": True,
     "request_min_open": False},
    {"field": "min_p", "names": ["min_p"], "type": "number", "min": 0, "max": 1},
    {"field": "repeat_penalty", "names": ["repetition_penalty", "repeat_penalty"], "type": "number", "min": 0,
     "max": None, "min_open": True},
    {"field": "repeat_last_n", "names": ["repeat_last_n"], "type": "integer", "min": -1, "max": None},
    {"field": "presence_penalty", "names": ["presence_penalty"], "type": "number", "min": -2, "max": 2},
    {"field": "frequency_penalty", "names": ["frequency_penalty"], "type": "number", "min": -2, "max": 2},
    {"field": "seed", "names": ["seed"], "type": "integer|null", "min": None, "max": None},
    {"field": "stop", "names": ["stop"], "type": "stop", "request_max_items": 4},
    {"field": "max_tokens", "names": ["max_tokens", "max_completion_tokens"], "type": "integer|null", "min": 1,
     "max": None},
    {"field": "response_format", "names": ["response_format"], "type": "response_format"},
    {"field": "grammar", "names": ["grammar"], "type": "string|null"},
    {"field": "regex", "names": ["regex"], "type": "string|null"},
]
RESPONSE_FORMATS = ["text", "json_object", "json_schema"]


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40             # <= 0: off
    top_p: float = 0.95         # 1: off
    min_p: float = 0.05         # 0: off
    repeat_penalty: float = 1.0  # 1: off; llama.cpp-style divide/multiply over the last `repeat_last_n` tokens
    repeat_last_n: int = 64      # 0: off; -1: the whole history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit before penalties
    max_tokens: int | None = None   # None: until EOS, a stop string or the end of the context
    # output constraints (runtime_py/grammar.py), at most one: {"type": "json_object" | "json_schema", ...}, GBNF, regex
    response_format: dict | None = None
    grammar: str | None = None
    regex: str | None = None

    @classmethod
    def from_request(cls, req: dict) -> SamplingParams:
        """An OpenAI / llama.cpp style request (a dict; other keys ignored) -> validated params, by REQUEST_TABLE.
        Mirrors web/sampler.js `SamplingParams.fromRequest`."""
        kw = {}
        for row in REQUEST_TABLE:
            given = [(n, req[n]) for n in row["names"] if req.get(n) is not None]
            if not given:
                continue
            (name, value), *others = [(n, _check(row, n, v, request=True)) for n, v in given]
            for other, v in others:
                if v != value:
                    raise InvalidParameterError(f"{name} and {other} are two names for one setting and were given "
                                                f"different values ({_show(value)}, {_show(v)}); give one",
                                                param=other)
            kw[row["field"]] = value
        p = cls(**kw)
        if p.top_p == 0:            # OpenAI accepts 0: only the most likely token
            p.top_p, p.top_k = 1.0, 1
        return p.validate()

    def validate(self):
        for row in REQUEST_TABLE:
            _check(row, row["field"], getattr(self, row["field"]))
        given = [n for n in ("response_format", "grammar", "regex") if getattr(self, n) is not None
                 and not (n == "response_format" and self.response_format["type"] == "text")]
        if len(given) > 1:
            raise InvalidParameterError(f"{given[0]} and {given[1]} are two output constraints; give one",
                                        param=given[1])
        return self

    @property
    def constrained(self) -> bool:
        """An output constraint is set (a grammar mask is applied each step: the CPU sampling path)."""
        rf = self.response_format
        return (rf is not None and rf["type"] != "text") or self.grammar is not None or self.regex is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _show(value) -> str:
    """A value as JSON.stringify writes it (2.0 as 2), so both runtimes word their messages alike."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _check(row: dict, name: str, value, request: bool = False):
    """`value` of table row `row` (given as `name`), type- and range-checked; returns it normalised."""
    kind = row["type"]
    if kind == "stop":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InvalidParameterError(f"{name} must be a string or a list of strings", param=name)
        limit = row.get("request_max_items") if request else None
        if limit is not None and len(value) > limit:
            raise InvalidParameterError(f"{name} takes at most {limit} strings (got {len(value)})", param=name)
        return list(value)
    if value is None and (kind.endswith("|null") or kind == "response_format"):
        return None
    if kind == "response_format":
        return _check_response_format(name, value)
    if kind == "string|null":
        if not isinstance(value, str):
            raise InvalidParameterError(f"{name} must be a string (got {_show(value)})", param=name)
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("integer"):
        if not number or (isinstance(value, float) and not value.is_integer()):
            raise InvalidParameterError(f"{name} must be an integer (got {_show(value)})", param=name)
        value = int(value)
    elif not number:
        raise InvalidParameterError(f"{name} must be a number (got {_show(value)})", param=name)
    lo, hi = row.get("min"), row.get("request_max") if request and "request_max" in row else row.get("max")
    lo_open = row.get("request_min_open" if request and "request_min_open" in row else "min_open", False)
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:   # also NaN, which compares false
        if hi is None:
            rng = f"{'>' if lo_open else '>='} {lo}"
        else:
            rng = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise InvalidParameterError(f"{name} must be {rng} (got {_show(value)})", param=name)
    return value


def _check_response_format(name: str, value):
    """OpenAI's shape: {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}, "strict": ...}}. The schema itself is checked by the grammar engine (runtime_py/grammar.py)."""
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        got = value.get("type") if isinstance(value, dict) else value
        raise InvalidParameterError(f"{name}.type must be one of {', '.join(RESPONSE_FORMATS)} (got {_show(got)})",
                                    param=name)
    if value["type"] == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise InvalidParameterError(f"{name}.json_schema.schema must be a JSON object (a JSON Schema)",
                                        param=name)
    return value


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
        n = len(history) if p.repeat_last_n < 0 else p.repeat_last_n
        recent = history[max(0, len(history) - n):] if n > 0 else []   # the last min(n, len) ids
        if not recent or (p.repeat_penalty == 1 and not p.presence_penalty and not p.frequency_penalty):
            return logits
        logits = logits.copy()
        ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        sel = logits[ids]
        sel = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        sel -= counts * p.frequency_penalty + p.presence_penalty
        logits[ids] = sel
        return logits

    def sample(self, logits: np.ndarray, history: list[int], mask: np.ndarray | None = None) -> int:
        """logits: (vocab,) float; history: prompt + generated ids; mask: (vocab,) bool, the tokens allowed (a
        grammar's, runtime_py/grammar.py; at least one True), others never chosen. Returns the chosen id."""
        p = self.p
        logits = self.apply_penalties(np.asarray(logits, dtype=np.float64), history)
        if mask is not None:
            from .grammar import apply_mask
            logits = apply_mask(logits, mask)
        if p.greedy:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")                       # candidates, best first
        if mask is not None:
            order = order[:int(np.count_nonzero(np.isfinite(logits)))]   # the allowed ones (sorted first)
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
