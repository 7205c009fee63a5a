"""Beam search over an abstract logits source: the algorithm and the request check, nothing else (no GPU: the
sessions' side is runtime_py/beam_sessions.py; tests/unit/test_beam_mock.py checks this against brute force).

    search = BeamSearch(width=3, max_tokens=8, eos_ids=tok.eog_ids, length_penalty=1.0)
    moves = search.step([logits])          # logits (vocab,) after each live beam -> [(parent beam, token)], [] = done
    ...                                    # the source makes live beam j = beam parent_j + token_j, then step again
    search.result()                        # [Hypothesis], best first

Definition (HF's and vLLM's beam search, made exact so that it can be checked by enumeration):
  - a hypothesis is a continuation y_1..y_L of the prompt, scored on the model's own distribution:
    cum_logprob = sum_i log p(y_i | prompt, y_<i), log-softmax of the raw logits in float64 (no temperature, no
    truncation, no penalties: sampling settings are refused with beams, `check_request`);
  - it ends with an end-of-generation token (finish "stop") or after max_tokens tokens ("length"). Stopping is one
    event whatever EOS id does it (a model has several: SmolLM2 0, 2, 4): its log-probability is the logsumexp of
    theirs, and it counts in cum_logprob and in L, not in `ids` (so no two hypotheses have the same text);
  - score = cum_logprob / L ** length_penalty, L >= 1 the generated tokens (vLLM divides by prompt + output
    length and leaves the EOS out; HF by the output length: we take the output, EOS included, so that a one-token
    answer "EOS" has L = 1). length_penalty 0: the plain cum logprob; > 0 favours longer hypotheses, < 0 shorter.
Search with width K, returning the n <= K best:
  live_0 = [prompt]; for t = 1 .. max_tokens:
    every live beam's stop is a finished hypothesis of length t (vLLM keeps EOS children among each beam's top 2K,
    HF those among the step's top K; we keep them all, so the result does not depend on such a cut-off);
    live_t = the K best non-EOS children of live_{t-1} by cum_logprob (ties: parent order, then token id);
    at t = max_tokens the live beams finish with "length".
  Finished hypotheses: the n best by score are kept (ties: the one finished first).
  Early stop, exact: once n are finished, a live beam with cum c after t tokens can at best reach
  c / L_b ** length_penalty with L_b = max_tokens if length_penalty > 0 else t + 1 (later tokens only lower c; HF's
  early_stopping="never" bound), so the search stops when no live beam's bound beats the worst kept hypothesis:
  stopping early never changes the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.errors import InvalidParameterError

MAX_BEAMS = 16          # K sessions (KV caches) per request: memory, and K forward passes per step
DEFAULT_LENGTH_PENALTY = 1.0    # HF's and vLLM's default
MAX_LENGTH_PENALTY = 10.0


@dataclass
class Beam:
    ids: list[int]
    cum: float                                   # cum_logprob of ids
    logprobs: list | None = None                 # per id: (id, logprob, [(id, logprob)] top alternatives)


@dataclass
class Hypothesis:
    ids: list[int]                               # generated ids, the EOS left out
    cum_logprob: float                           # the stop's log-probability included ("stop")
    score: float                                 # cum_logprob / len ** length_penalty, len counting the EOS
    finish_reason: str                           # "stop" (EOS) | "length"
    logprobs: list | None = None                 # per id (id, logprob, tops) when asked for


@dataclass(frozen=True)
class BeamSpec:
    """A validated beam request: `width` beams searched, the `n` best returned."""
    width: int
    n: int
    length_penalty: float = DEFAULT_LENGTH_PENALTY


def log_softmax(logits) -> np.ndarray:
    """(vocab,) float64 log-probabilities of (vocab,) logits (as sampling.top_logprobs computes them)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def top_tokens(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest finite values of x, ties by id: np.argsort(-x, kind="stable")[:k] without sorting all of
    the vocabulary."""
    k = min(k, int(np.isfinite(x).sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    v = np.partition(x, len(x) - k)[len(x) - k]          # the k-th largest value
    above = np.flatnonzero(x > v)
    sel = np.concatenate([above, np.flatnonzero(x == v)[:k - len(above)]])
    return sel[np.lexsort((sel, -x[sel]))]


class BeamSearch:
    def __init__(self, width: int, max_tokens: int, eos_ids=(), n: int | None = None,
                 length_penalty: float = DEFAULT_LENGTH_PENALTY, logprobs: int = -1):
        """logprobs: -1 none; k >= 0: each hypothesis carries its tokens' logprobs and k top alternatives."""
        n = width if n is None else n
        if not 1 <= n <= width or max_tokens < 1:
            raise ValueError(f"BeamSearch: need 1 <= n ({n}) <= width ({width}) and max_tokens ({max_tokens}) >= 1")
        self.width, self.n, self.max_tokens, self.alpha = width, n, max_tokens, float(length_penalty)
        self.eos = sorted(set(int(e) for e in eos_ids))
        self.n_top = logprobs
        self.live = [Beam([], 0.0, [] if logprobs >= 0 else None)]
        self.finished: list[tuple[float, int, Hypothesis]] = []   # (-score, order), best first, at most n
        self.t = 0                                   # tokens generated by every live beam
        self.done = False

    def score(self, cum: float, length: int) -> float:
        return cum / length ** self.alpha

    def bound(self, cum: float) -> float:
        """The best score a live beam (cum after self.t tokens) can still finish with (module doc)."""
        return cum / (self.max_tokens if self.alpha > 0 else self.t + 1) ** self.alpha

    def _finish(self, ids, cum: float, length: int, reason: str, lps):
        s = self.score(cum, length)
        self._order = getattr(self, "_order", 0) + 1
        self.finished.append((-s, self._order, Hypothesis(list(ids), cum, s, reason, lps)))
        self.finished.sort(key=lambda f: (f[0], f[1]))
        del self.finished[self.n:]

    def step(self, rows) -> list[tuple[int, int]]:
        """rows[i]: logits (vocab,) after live beam i. Returns the moves [(parent, token)] that make the next live
        beams, in order; [] when the search is over (then `result()`)."""
        if self.done:
            raise ValueError("BeamSearch.step: the search is over")
        if len(rows) != len(self.live):
            raise ValueError(f"BeamSearch.step: {len(rows)} rows of logits for {len(self.live)} live beams")
        self.t = t = self.t + 1
        cands, tops = [], []
        for i, (b, row) in enumerate(zip(self.live, rows)):
            lp = log_softmax(row)
            # the model's own top alternatives at this position (EOS among them), for the logprobs of its children
            tops.append((lp, [(int(j), float(lp[j])) for j in top_tokens(lp, self.n_top)]) if self.n_top >= 0
                        else None)
            eos = [e for e in self.eos if e < len(lp)]
            if eos:                                   # stopping: any end-of-generation token (one hypothesis)
                m = lp[eos].max()
                self._finish(b.ids, b.cum + m + np.log(np.exp(lp[eos] - m).sum()), t, "stop", b.logprobs)
            cont = lp.copy()
            cont[eos] = -np.inf
            # a parent's children outside its own top K cannot be among the K best overall
            cands += [(b.cum + cont[tok], i, int(tok)) for tok in top_tokens(cont, self.width)]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        live = []
        for cum, i, tok in cands[:self.width]:
            parent = self.live[i]
            lps = None
            if parent.logprobs is not None:
                lp, alts = tops[i]
                lps = parent.logprobs + [(tok, float(lp[tok]), alts)]
            live.append(Beam(parent.ids + [tok], float(cum), lps))
        moves = [(i, tok) for _, i, tok in cands[:self.width]]
        self.live = live
        if t == self.max_tokens:
            for b in live:
                self._finish(b.ids, b.cum, t, "length", b.logprobs)
            self.live, self.done = [], True
        elif not live or (len(self.finished) == self.n
                          and all(self.bound(b.cum) <= -self.finished[-1][0] for b in live)):
            self.done = True
        return [] if self.done else moves

    def result(self) -> list[Hypothesis]:
        """The n best finished hypotheses, best first (after step returned [])."""
        if not self.done:
            raise ValueError("BeamSearch.result: the search is not over")
        return [h for _, _, h in self.finished]


def beam_search(source, width: int, max_tokens: int, eos_ids=(), n: int | None = None,
                length_penalty: float = DEFAULT_LENGTH_PENALTY, logprobs: int = -1) -> list[Hypothesis]:
    """Run a search on `source`: `source.start()` -> [logits after the prompt]; `source.advance(moves)` -> the
    logits after each new live beam (the source forks its beams: live j = old live parent_j + token_j)."""
    search = BeamSearch(width, max_tokens, eos_ids, n, length_penalty, logprobs)
    rows = source.start()
    while moves := search.step(rows):
        rows = source.advance(moves)
    return search.result()


# --- requests: which fields combine with beam search ---------------------------------------------------------------

# sampling fields that change the distribution beam search scores: given, they must have their neutral value
NEUTRAL = {"temperature": (0,), "top_p": (1,), "min_p": (0,), "repetition_penalty": (1,), "repeat_penalty": (1,),
           "presence_penalty": (0,), "frequency_penalty": (0,)}


def check_request(req: dict) -> BeamSpec | None:
    """The beam request in `req` (request fields, absent = None: the API's body, the CLI's given flags), or None
    when it asks for no beam search. Raises InvalidParameterError naming the field that cannot be combined.

    Fields (vLLM's extension of OpenAI's API): use_beam_search; best_of = beams searched (default n); n = best
    hypotheses returned (default 1, <= best_of); length_penalty (default 1.0). Without use_beam_search,
    length_penalty and early_stopping are refused (they would be ignored); n / best_of stay the caller's business."""
    if not req.get("use_beam_search"):
        for name in ("length_penalty", "early_stopping"):
            if req.get(name) is not None:
                raise InvalidParameterError(f"{name} applies to beam search only (use_beam_search: true; kiln run "
                                            f"--beams K)", name)
        return None
    n, best_of = req.get("n"), req.get("best_of")
    for name, v in (("n", n), ("best_of", best_of)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BEAMS):
            raise InvalidParameterError(f"{name} must be an integer from 1 to {MAX_BEAMS} with beam search (each "
                                        f"beam holds its own KV cache; got {v!r})", name)
    n = n or 1
    width = best_of or n
    if n > width:
        raise InvalidParameterError(f"n ({n}) must not exceed best_of ({width}): beam search returns at most the "
                                    f"beams it searches", "n")
    lp = req.get("length_penalty")
    if lp is None:
        lp = DEFAULT_LENGTH_PENALTY
    elif isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) \
            or abs(lp) > MAX_LENGTH_PENALTY:
        raise InvalidParameterError(f"length_penalty must be a number from -{MAX_LENGTH_PENALTY:g} to "
                                    f"{MAX_LENGTH_PENALTY:g} (got {lp!r})", "length_penalty")
    if req.get("early_stopping") is not None:
        raise InvalidParameterError("early_stopping is not configurable: kiln's beam search stops exactly when no "
                                    "live beam can beat the n-th finished one (HF's early_stopping=\"never\")",
                                    "early_stopping")
    for name, ok in NEUTRAL.items():
        v = req.get(name)
        if v is not None and v not in ok:
            raise InvalidParameterError(f"beam search scores the model's own log-probabilities: {name} "
                                        f"{'must be 0' if name == 'temperature' else 'cannot be set'} with beam "
                                        f"search (got {v!r})", name)
    if (req.get("top_k") or 0) > 0:
        raise InvalidParameterError("beam search scores the model's own log-probabilities: top_k cannot be set with "
                                    "it", "top_k")
    for name in ("stop", "logit_bias", "grammar", "regex"):
        if req.get(name):
            raise InvalidParameterError(f"{name} is not implemented with beam search", name)
    rf = req.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise InvalidParameterError("response_format (output constraints) is not implemented with beam search",
                                    "response_format")
    return BeamSpec(width, n, float(lp))
