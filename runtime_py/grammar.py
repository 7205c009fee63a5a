"""Constrained decoding: a request's output constraint -> a token mask per step, by llguidance (the grammar engine of
llama.cpp and vLLM; a Rust wheel with no Python dependencies). Mirrors web/grammar.js, which uses
@mlc-ai/web-xgrammar (WebLLM's engine) for the same four kinds of constraint:

    response_format {"type": "json_object"}                      any JSON object
    response_format {"type": "json_schema", "json_schema": {"schema": {...}, ...}}   JSON valid against the schema
    grammar "<GBNF>"                                             llama.cpp's GBNF (both engines read it: llguidance
                                                                 through its own gbnf_to_lark, xgrammar as EBNF)
    regex "<pattern>"                                            the whole output matches the pattern

JSON is compact (no whitespace between tokens: "," and ":" separators), on both sides, so outputs stay short and the
grammar ends generation as soon as the value is complete.

    c = constraint_for(params, tokenizer)     # None without a constraint; InvalidParameterError (-> 400) if the
    m = c.matcher()                           # engine rejects it; compiled once per (constraint, tokenizer)
    mask = m.mask()                           # (vocab,) bool: the tokens the grammar allows next; None: no token can
    m.consume(tok)                            # continue it (generation ends, finish_reason "grammar")
    m.done                                    # the value is complete: nothing but end-of-generation may follow
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from compiler.errors import InvalidParameterError

CACHE_SIZE = 64        # compiled grammars kept (a prototype matcher each, copied per request)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

# finish_reason when the grammar admits no token the model has (an unsatisfiable state, e.g. a regex needing a
# character no token can produce); OpenAI has no such reason, llama.cpp / vLLM would loop or error.
FINISH_GRAMMAR = "grammar"

_lock = threading.Lock()
_tokenizers: dict[int, object] = {}            # id(Tokenizer) -> (Tokenizer, LLTokenizer)
_compiled: OrderedDict = OrderedDict()         # (kind, source, id(LLTokenizer)) -> prototype LLMatcher


def spec_of(params) -> tuple[str, str, str] | None:
    """(kind, source text, request field) of the constraint in `params` (SamplingParams), or None.
    kind: "json_object" | "json_schema" | "grammar" | "regex"."""
    rf = params.response_format
    if rf is not None and rf["type"] != "text":
        if rf["type"] == "json_object":
            return "json_object", "", "response_format"
        schema = rf["json_schema"]["schema"]
        return "json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")), "response_format"
    if params.grammar is not None:
        return "grammar", params.grammar, "grammar"
    if params.regex is not None:
        return "regex", params.regex, "regex"
    return None


def constraint_for(params, tokenizer) -> Constraint | None:
    spec = spec_of(params)
    return None if spec is None else Constraint(*spec, tokenizer)


def _ll_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (its tokenizer.json), built once per Tokenizer (~1-3 s: a trie of the
    vocabulary). End-of-generation ids are the manifest's eog_ids, so a finished grammar allows exactly those."""
    import llguidance
    with _lock:
        hit = _tokenizers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    ll = llguidance.LLTokenizer(tokenizer._json, n_vocab=tokenizer.vocab_size,
                                eos_token=sorted(tokenizer.eog_ids) or None)
    with _lock:
        _tokenizers[id(tokenizer)] = (tokenizer, ll)
    return ll


def _grammar_text(kind: str, source: str, param: str) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark
    try:
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(source)
        try:
            lark = gbnf_to_lark(source)
        except (GbnfToLarkError, Exception) as e:   # noqa: BLE001 — the converter raises plain Exception too
            raise InvalidParameterError(f"the grammar engine rejected it (GBNF): {e}", param=param) from None
        return LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise InvalidParameterError(f"the grammar engine rejected it: {e}", param=param) from None


class Constraint:
    """One compiled constraint for one tokenizer; `matcher()` gives a fresh per-request state."""

    def __init__(self, kind: str, source: str, param: str, tokenizer):
        self.kind, self.source, self.param = kind, source, param
        self.vocab = tokenizer.vocab_size
        ll = _ll_tokenizer(tokenizer)
        key = (kind, source, id(ll))
        with _lock:
            proto = _compiled.get(key)
            if proto is not None:
                _compiled.move_to_end(key)
        if proto is None:
            from llguidance import LLMatcher
            proto = LLMatcher(ll, _grammar_text(kind, source, param), log_level=0)
            if proto.is_error():
                raise InvalidParameterError(f"the grammar engine rejected it: {proto.get_error()}", param=param)
            with _lock:
                _compiled[key] = proto
                while len(_compiled) > CACHE_SIZE:
                    _compiled.popitem(last=False)
        self._proto = proto

    def matcher(self) -> Matcher:
        return Matcher(self._proto.deep_copy(), self.vocab)


class Matcher:
    def __init__(self, m, vocab: int):
        self.m, self.vocab = m, vocab

    def mask(self) -> np.ndarray | None:
        """(vocab,) bool of the tokens allowed next; None when none is (or the engine is in an error state)."""
        if self.m.is_error():
            return None
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)     # little-endian u32 words, bit i = token i
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool)
        return allowed if allowed.any() else None

    def consume(self, tok: int) -> bool:
        return bool(self.m.consume_token(tok))

    @property
    def done(self) -> bool:
        """Complete: the grammar takes nothing but end-of-generation now."""
        return self.m.is_stopped() and not self.m.is_error()

    @property
    def error(self) -> str:
        return self.m.get_error()


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """logits (n,) with every token the mask does not allow at -inf; ids past the mask (padding rows) too."""
    out = np.full(logits.shape, -np.inf, dtype=np.float64)
    n = min(len(mask), len(logits))
    out[:n] = np.where(mask[:n], logits[:n], -np.inf)
    return out
