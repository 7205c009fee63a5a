"""Prefix reuse: a Session's KV cache remembers the token ids it holds (`Session.held`), and a new prompt that starts
with some of them prefills only the rest. Mirrors web/kvcache.js (same names, same steps).

    cached = reuse_prefix(session, prompt_ids)   # keeps held[:cached], forgets the rest
    session.forward(prompt_ids[cached:])          # prefill only what is new

Every chat turn re-sends the whole conversation; with this, turn N prefills only turn N's message (and whatever of
the last reply the template re-tokenizes differently), as llama.cpp's server does with `cache_prompt`.

Which tokens are held: everything a forward ran, in order — the prompt, then each generated token that was fed back
(the last sampled token of a reply is not: nothing consumed it yet). Positions past `held` are stale and are
overwritten by the next forward, so forgetting is only `Session.reset(n)`.

Numerics: a token's K/V (and logits) from the prefill kernels do not depend on the other tokens of its chunk, so a
prompt prefilled as [cached | rest] gives the same values as one prefilled whole — except that a chunk of exactly one
token runs the `decode` program (a mat-vec with another summation order). `reuse_prefix` therefore never leaves a
rest whose last chunk is one token when it can keep one token fewer: the last prompt token then goes through the same
kernels as in a run without reuse, and greedy ids with reuse equal the ids without (tests/gpu/test_serving.py).
K/V of *generated* tokens came from decode steps; a later turn reuses them as they are, as every engine does.

The server's slot choice (`pick_slot`) follows llama.cpp's: the free slot whose held tokens share the longest
prefix with the prompt, least recently used among equals; a slot that shares less than half the prompt is only
taken when no new slot can be made.
"""
from __future__ import annotations

SIMILARITY = 0.5     # llama.cpp server's default slot_prompt_similarity: reuse a slot only for this share of prompt


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(held, prompt_ids, chunk: int) -> int:
    """How many leading tokens of `prompt_ids` can stay in a cache holding `held`: the common prefix, less the last
    prompt token (always run: its logits pick the first new token), less one more if the rest would end in a
    one-token chunk (see the module docstring)."""
    n = min(common_prefix(held, prompt_ids), len(prompt_ids) - 1)
    if n > 0 and (len(prompt_ids) - n) % chunk == 1 and len(prompt_ids) % chunk != 1:
        n -= 1
    return max(n, 0)


def reuse_prefix(session, prompt_ids) -> int:
    """Keep the reusable prefix of `session`'s cache for `prompt_ids` and forget the rest; returns its length (the
    number of cached prompt tokens: the caller prefills prompt_ids[n:])."""
    n = reusable(session.held, prompt_ids, session.chunk)
    session.reset(n)
    return n


def pick_slot(free: list, prompt_ids, can_grow: bool):
    """The free session to run `prompt_ids` on, or None for "make a new one". `free` holds sessions that have a
    `last_used` counter (higher = more recent)."""
    if not free:
        return None
    best = max(free, key=lambda s: (reusable(s.held, prompt_ids, s.chunk), -s.last_used))
    shared = reusable(best.held, prompt_ids, best.chunk)
    if can_grow and shared < SIMILARITY * len(prompt_ids):
        return None
    if shared == 0:                        # nothing to reuse anywhere: the least recently used slot
        best = min(free, key=lambda s: s.last_used)
    return best
