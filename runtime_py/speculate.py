"""Speculative decoding, exact: a drafter guesses the next k tokens, the target model scores them all in one pass
(the `score` program: logits of every position, compiler/schedule.py) and keeps the longest prefix it agrees with,
plus one token of its own, so each pass yields 1..k+1 tokens.

    drafter = drafter_for("ngram") | drafter_for("smollm2", ctx)   # the target's vocabulary
    for ev in generate(session, tok, ids, params, speculate=drafter): ...   # generate.py hands the loop to us

Exactness. Greedy: a draft token is kept iff it is the target's argmax at its position, so the ids are those of plain
greedy decoding (up to the last-bit differences between the score and decode programs' logits, which flip only exact
ties; the reference prompts check it). Sampling: drafts are point masses q = 1{d}, so the standard rejection rule
(Leviathan et al. 2023) is: keep d with probability p(d), where p is the target's sampling distribution at that
position (temperature, top-k/p, min-p, penalties and grammar mask applied: Sampler.candidates); on rejection draw from
p with d removed, renormalised. The output distribution is exactly p's, step by step.

Drafters (both return at most k ids, possibly none: then the step is a plain decode step):
    NgramDrafter   prompt lookup: the most recent earlier occurrence of the last n tokens (n = 5 .. 2, longest first)
                   in the prompt + output, and the k tokens that followed it (no second model; strong when the output
                   quotes or edits the prompt: code rewrites, summaries, extraction); k adapts (DraftLength)
    ModelDrafter   a second, smaller model with the same vocabulary, greedy; its own session follows the target's
                   history (rewound to the common prefix on a rejection)

The session's cache holds `history` minus the token chosen last (`pending`); a pass scores [pending] + drafts and,
after verification, rewinds to the accepted prefix (the rejected positions are overwritten later, Session.reset).
Timings gain draft_tokens, accepted_tokens, acceptance_rate and passes (target forward passes after the prompt).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from compiler.errors import KilnError

DRAFT_K = 7              # most tokens drafted per pass (the score chunk bounds it too): [pending] + 7 = one x window
                         # of the CPU-adapter score program's matmuls (compiler/schedule.py CPU_WINDOW)
NGRAM_MAX, NGRAM_MIN = 5, 2      # longest match first (a longer one picks the right occurrence of a repeated
                                 # phrase); a one-token match drafts noise more often than not
# A score pass of [pending] + k drafts costs about c0 + c1 * k decode steps, per adapter class (runtime_py/device.py).
# Measured on lavapipe (SmolLM2, position 216, tests/bench_speculate.py's prompt): 1.35 / 1.43 / 1.96 / 3.0 / 3.4
# decode steps for 1 / 2 / 4 / 6 / 8 tokens; the slope is attention, whose cost grows with the tokens scored while
# the window matmuls read each weight once. A discrete GPU: the pass costs about a decode step.
PASS_COST = {"cpu": (1.0, 0.33), "gpu": (1.0, 0.1)}


class DraftLength:
    """Adaptive draft length: the k in 0..k_max with the most expected tokens per unit of cost, from an exponential
    average of the drafts' per-token acceptance (the ids alone decide it: runs are reproducible). A pass of k drafts
    yields sum_{i<=k} a^i tokens on average at per-token acceptance a, for c0 + c1 k decode steps (PASS_COST); k = 0
    is a plain decode step (1 token, cost 1). During plain steps the drafter's first guess is still checked against
    the token the step chose (`probe`: free for prompt lookup), so the estimate recovers when the output starts
    quoting."""

    WEIGHT = 0.2          # of each draft token's outcome in the average

    def __init__(self, k_max: int, cost=PASS_COST["gpu"]):
        self.k_max, (self.c0, self.c1) = k_max, cost
        self.acceptance = 0.5                      # prior

    def k(self) -> int:
        a = min(self.acceptance, 0.999)
        best, best_v = 0, 1.0
        for k in range(1, self.k_max + 1):
            v = (1 - a ** (k + 1)) / (1 - a) / (self.c0 + self.c1 * k)
            if v > best_v:
                best, best_v = k, v
        return best

    def _trial(self, hit: bool):
        self.acceptance += self.WEIGHT * (float(hit) - self.acceptance)

    def update(self, drafted: int, kept: int):
        """A pass: `kept` of `drafted` drafts accepted (the first rejection ends the trials)."""
        for _ in range(kept):
            self._trial(True)
        if kept < drafted:
            self._trial(False)

    def probe(self, hit: bool):
        self._trial(hit)


class NgramDrafter:
    name = "ngram"

    def __init__(self, k: int = DRAFT_K, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN, adaptive: bool = True):
        """k: the most tokens per draft; adaptive: fewer (or none) as the acceptance falls (DraftLength)."""
        self.k, self.n_max, self.n_min, self.adaptive = k, n_max, n_min, adaptive

    def draft(self, history: list[int], k: int) -> list[int]:
        """The k ids that followed the latest earlier occurrence of history's last n ids (longest n first)."""
        h = np.asarray(history, dtype=np.int64)
        for n in range(min(self.n_max, len(h) - 1), self.n_min - 1, -1):
            tail = h[-n:]
            # windows h[i:i+n] for i < len(h) - n (not the tail itself), latest first
            win = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
            hits = np.flatnonzero((win == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return h[start:start + k].tolist()
        return []


class ModelDrafter:
    """A draft model's session kept in step with the target's history; drafts greedily (GPU argmax). Fixed k: a
    probe would cost draft-model steps."""
    adaptive = False

    def __init__(self, model, ctx: int, name: str, k: int = DRAFT_K):
        self.session, self.name, self.k = model.session(ctx), name, k
        self.cached: list[int] = []          # the ids in the draft session's cache, in order

    def draft(self, history: list[int], k: int) -> list[int]:
        s = self.session
        k = min(k, s.ctx - len(history))
        if k <= 0:
            return []
        common = 0
        for a, b in zip(self.cached, history):
            if a != b:
                break
            common += 1
        common = min(common, len(history) - 1)     # re-run at least the last id: its logits give the first draft
        s.reset(common)
        s.forward(history[common:])
        out = [s.next_token()]
        for _ in range(k - 1):
            s.forward(out[-1:])
            out.append(s.next_token())
        self.cached = list(history) + out[:-1]
        return out


def drafter_for(spec: str, ctx: int | None = None, target=None, k: int = DRAFT_K):
    """`--speculate` value -> a drafter: "ngram", or a draft model (a name or artifact/GGUF path, as `kiln run`).
    target: the target Model (its vocabulary is checked; the same artifact is reused, not loaded twice)."""
    if spec == "ngram":
        return NgramDrafter(k)
    from .artifacts import check_model_arg, ensure_artifact
    from .model import Model
    check_model_arg(spec)
    art = ensure_artifact(spec, log=lambda *a: None)
    model = target if target is not None and Path(art).resolve() == target.dir.resolve() else Model(art)
    if target is not None and model.config["vocab"] != target.config["vocab"]:
        raise KilnError(f"--speculate {spec}: the draft model's vocabulary has {model.config['vocab']} tokens, the "
                        f"target's {target.config['vocab']}; a draft model must share the target's tokenizer")
    return ModelDrafter(model, ctx or 2048, spec, k)


class Verifier:
    """The target's side of a pass: choose tokens from rows of logits, keep drafts by the rule above."""

    def __init__(self, sampler, matcher):
        self.sampler, self.matcher = sampler, matcher

    def _mask(self):
        return self.matcher.mask() if self.matcher is not None else None

    def choose(self, logits, history):
        """One token from one row (None: the grammar allows nothing)."""
        mask = self._mask()
        if self.matcher is not None and mask is None:
            return None
        return self.sampler.sample(logits, history, mask)

    def accepts(self, logits, history, d: int):
        """(kept, token): kept True -> d is taken; else token is the replacement drawn (None: grammar dead end)."""
        mask = self._mask()
        if self.matcher is not None and mask is None:
            return False, None
        order, w = self.sampler.candidates(logits, history, mask)
        if w is None:                                          # greedy
            return (True, d) if int(order[0]) == d else (False, int(order[0]))
        p = w / w.sum()
        hit = np.flatnonzero(order == d)
        pd = float(p[hit[0]]) if len(hit) else 0.0
        if pd > 0 and self.sampler.rng.next() < pd:
            return True, d
        if len(hit):                                           # the residual: p without d, renormalised
            w = w.copy()
            w[hit[0]] = 0.0
        if not w.sum() > 0:                                    # p was all on d (then it was kept above)
            return True, d
        cdf = np.cumsum(w)
        r = self.sampler.rng.next() * cdf[-1]
        return False, int(order[min(int(np.searchsorted(cdf, r, side="right")), len(order) - 1)])


def speculative_tokens(session, history: list[int], sampler, matcher, drafter, max_tokens: int, stats: dict,
                       want_logits: bool, score_chunk: int):
    """Yields (id, logits row | None) for each generated id (generate_speculative feeds them to its stop / EOS /
    grammar checks and closes us when it is done). `history` is the caller's list: it grows as ids are yielded.
    The prompt is already forwarded."""
    v = Verifier(sampler, matcher)
    p = sampler.p
    fast = p.greedy and matcher is None and not want_logits and p.repeat_penalty == 1 \
        and not p.presence_penalty and not p.frequency_penalty          # plain steps: GPU argmax, 4 bytes read

    def plain():
        if fast:
            return session.next_token(), None
        row = session.logits()
        return v.choose(row, history), row

    cost = PASS_COST.get(getattr(session.model, "adapter_class", "gpu"), PASS_COST["gpu"])
    length = DraftLength(drafter.k, cost) if getattr(drafter, "adaptive", False) else None

    tok, row = plain()                                   # from the prompt's last position
    n = 0
    while tok is not None:
        yield tok, row                                   # the caller appends it to history (and may stop here)
        n += 1
        room = max_tokens - n
        if room <= 0:
            return
        k = min(length.k() if length else drafter.k, room - 1, score_chunk - 1)
        drafts = drafter.draft(history, k) if k > 0 else []
        guess = drafter.draft(history, 1) if length and k == 0 else []    # checked against the plain step's token
        stats["passes"] += 1
        if not drafts:                                   # a plain decode step
            session.forward([tok])
            tok, row = plain()
            if guess:
                length.probe(guess[0] == tok)
            continue
        stats["draft_tokens"] += len(drafts)
        base = session.pos
        rows = next(iter(session.score_chunks([tok] + drafts)))      # (1 + len(drafts), vocab)
        kept = 0
        for i, d in enumerate(drafts):
            ok, tok = v.accepts(rows[i], history, d)
            row = rows[i]
            if not ok:
                break
            kept += 1
            stats["accepted_tokens"] += 1
            yield d, row
            n += 1
            if n >= max_tokens:
                return
        else:
            row = rows[len(drafts)]
            tok = v.choose(row, history)                          # every draft kept: one more from the last row
        if length:
            length.update(len(drafts), kept)
        session.reset(base + 1 + kept)                            # [pending] + the kept drafts stay in the cache


def generate_speculative(session, tokenizer, prompt_ids, params, drafter, *, max_tokens, logprobs, eog_ids,
                         should_stop, reuse=True):
    """generate()'s loop with speculation; same events, same finish reasons, timings + acceptance."""
    from .generate import FINISH_GRAMMAR, Done, StopStrings, Token
    from .grammar import constraint_for
    from .sampling import Sampler, top_logprobs
    from .tokenizer import StreamDecoder
    sampler = Sampler(params)
    constraint = constraint_for(params, tokenizer)
    matcher = constraint.matcher() if constraint is not None else None
    decoder, stops = StreamDecoder(tokenizer), StopStrings(params.stop)
    history, out_ids, text = list(prompt_ids), [], []
    eog = set(eog_ids)
    stats = {"draft_tokens": 0, "accepted_tokens": 0, "passes": 0}

    t0 = time.perf_counter()
    cached = 0
    if reuse and hasattr(session, "held"):                          # prefix reuse, as generate.py (runtime_py/kvcache.py)
        from .kvcache import reuse_prefix
        cached = reuse_prefix(session, prompt_ids)
    else:
        session.reset()
    session.forward(prompt_ids[cached:])
    t_first = None
    finish, cut = FINISH_GRAMMAR, False                   # the token source ends only on a grammar dead end
    source = speculative_tokens(session, history, sampler, matcher, drafter, max_tokens, stats, bool(logprobs),
                                session.model.manifest["limits"]["score_chunk"])
    for tok, row in source:
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
        yield Token(tok, delta, top_logprobs(row, logprobs) if logprobs else None)
        if cut or should_stop() or (matcher is not None and matcher.done):
            finish = "stop"
            break
        if len(out_ids) >= max_tokens:
            finish = "length"
            break
    else:
        if len(out_ids) >= max_tokens:
            finish = "length"
    source.close()
    if not cut:
        tail, cut = stops.feed(decoder.flush())
        tail += "" if cut else stops.flush()
        finish = "stop" if cut else finish
        if tail:
            text.append(tail)
            yield Token(-1, tail, None)
    t_end = time.perf_counter()
    n = len(out_ids)
    timings = {
        "prompt_tokens": len(prompt_ids), "cached_tokens": cached, "generated_tokens": n,
        "ttft_s": round((t_first or t_end) - t0, 4),
        "prefill_tok_s": round((len(prompt_ids) - cached) / max((t_first or t_end) - t0, 1e-9), 2),
        "decode_tok_s": round((n - 1) / (t_end - t_first), 2) if n > 1 and t_first else None,
        "total_s": round(t_end - t0, 4),
        "speculate": drafter.name, **stats,
        "acceptance_rate": round(stats["accepted_tokens"] / stats["draft_tokens"], 4) if stats["draft_tokens"] else None,
    }
    yield Done(out_ids, "".join(text), finish, timings)
