"""runtime_py/kvcache.py without a GPU: the reusable prefix and the server's slot choice."""
from __future__ import annotations

import pytest

from runtime_py.kvcache import SIMILARITY, common_prefix, pick_slot, reusable, reuse_prefix


class FakeSession:
    """What kvcache reads and calls on a Session: held, chunk, reset (the real one: runtime_py/model.py)."""

    def __init__(self, held, chunk=8, last_used=0):
        self.held, self.chunk, self.last_used, self.pos = list(held), chunk, last_used, len(held)

    def reset(self, pos=0):
        assert 0 <= pos <= len(self.held)
        self.pos = pos
        del self.held[pos:]


def test_common_prefix():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([5], [1]) == 0


def test_reusable_always_runs_the_last_prompt_token():
    assert reusable([1, 2, 3, 4], [1, 2, 3, 4], chunk=8) == 2        # 3 would leave a one-token chunk: 2
    assert reusable([1, 2, 3, 4, 5, 6], [1, 2, 3], chunk=8) == 1     # the prompt is a prefix of what is held
    assert reusable([1, 2, 3], [1, 2, 3, 4, 5], chunk=8) == 3        # rest [4, 5]: two tokens, prefill as usual
    assert reusable([9], [1, 2, 3], chunk=8) == 0
    assert reusable([1], [1], chunk=8) == 0                          # a one-token prompt: nothing to keep


@pytest.mark.parametrize("n_prompt", range(2, 30))
@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_reusable_never_ends_in_a_one_token_chunk_unless_a_fresh_prefill_would(n_prompt, chunk):
    prompt = list(range(n_prompt))
    for held_len in range(n_prompt + 3):
        n = reusable(list(range(held_len)), prompt, chunk)
        assert 0 <= n <= min(held_len, n_prompt - 1)
        assert n >= min(held_len, n_prompt - 1) - 1                  # at most one token given back
        if chunk > 1 and (n_prompt - n) % chunk == 1:
            assert n == 0 or n_prompt % chunk == 1


def test_reuse_prefix_forgets_the_rest():
    s = FakeSession([1, 2, 3, 7, 8])
    assert reuse_prefix(s, [1, 2, 3, 4, 5]) == 3
    assert s.held == [1, 2, 3] and s.pos == 3


def test_pick_slot_longest_prefix_then_lru():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    a = FakeSession([1, 2, 3, 4, 5, 6, 7, 0], last_used=5)
    b = FakeSession([1, 2, 3, 4, 5, 6, 7, 8], last_used=1)
    c = FakeSession([], last_used=0)
    assert pick_slot([a, b, c], prompt, can_grow=False) is b
    assert pick_slot([a, c], prompt, can_grow=True) is a            # 7 of 10 shared: worth reusing
    d, e = FakeSession([1, 2, 3, 4, 5, 6], last_used=3), FakeSession([1, 2, 3, 4, 5, 6], last_used=2)
    assert pick_slot([d, e], prompt, can_grow=False) is e          # equal prefixes: the least recently used


def test_pick_slot_grows_rather_than_clobber_a_slot_sharing_little():
    prompt = list(range(10))
    small = FakeSession([0, 1, 99, 98], last_used=0)                 # 2 of 10 < SIMILARITY
    assert 2 < SIMILARITY * len(prompt)
    assert pick_slot([small], prompt, can_grow=True) is None
    assert pick_slot([small], prompt, can_grow=False) is small
    assert pick_slot([], prompt, can_grow=True) is None
    old, new = FakeSession([5], last_used=1), FakeSession([6], last_used=9)
    assert pick_slot([new, old], prompt, can_grow=False) is old     # nothing shared: LRU
