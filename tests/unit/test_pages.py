"""The KV page allocator (runtime_py/pages.py): sharing of full prefix pages (reference counts, append-only), LRU
eviction of unreferenced cached pages, reservations and exhaustion (wait, or refuse by name when it can never fit)."""
from __future__ import annotations

import pytest

from runtime_py.pages import KVPoolTooSmallError, PageAllocator

P = 4


def run(alloc: PageAllocator, seq, ids):
    """What the scheduler does for each row: pages for the position, then the token is held."""
    for t in ids:
        alloc.grow(seq, seq.pos + 1)
        seq.append(t)


def test_a_sequence_takes_pages_as_it_grows_and_gives_them_back():
    a = PageAllocator(pages=8, page=P)
    seq = a.admit(list(range(6)), tokens=10)
    assert seq.pos == 0 and seq.reserved == 3 and a.available() == 5
    run(a, seq, range(6))
    assert len(seq.pages) == 2 and seq.reserved == 1 and len(seq.keys) == 1   # one full page, keyed
    assert a.stats()["pages_used"] == 2
    a.release(seq)
    st = a.stats()
    assert (st["pages_used"], st["pages_cached"], st["pages_free"], st["pages_reserved"]) == (0, 1, 7, 0)
    a.release(seq)   # twice: nothing more
    assert a.stats()["pages_free"] == 7


def test_full_prefix_pages_are_shared_not_copied():
    a = PageAllocator(pages=8, page=P)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    s1 = a.admit(prompt, tokens=12)
    run(a, s1, prompt)                       # pages: [5..8] [9..12] [13 14 _ _]
    s2 = a.admit(prompt[:9] + [99], tokens=12)
    assert s2.held == prompt[:8] and s2.pages == s1.pages[:2]   # two full pages mapped, the rest to prefill
    assert [a.ref[p] for p in s1.pages] == [2, 2, 1]
    run(a, s2, [13, 99])
    assert s2.pages[2] != s1.pages[2]        # its own third page: shared pages are never written
    s3 = a.admit(prompt[:8], tokens=8)       # the whole prompt in cached pages: its last token still runs
    assert s3.held == prompt[:4]
    a.release(s1)
    assert a.ref[s2.pages[0]] == 2 and a.stats()["pages_cached"] == 0
    for s in (s2, s3):
        a.release(s)
    assert a.stats()["pages_used"] == 0 and a.stats()["pages_cached"] == 2   # only full pages stay findable
    s4 = a.admit(prompt, tokens=12)
    assert s4.held == prompt[:8] and a.hits == 2 + 1 + 2


def test_a_page_filled_by_generated_tokens_is_reused_by_the_next_turn():
    a = PageAllocator(pages=8, page=P)
    turn1 = [1, 2, 3]
    s = a.admit(turn1, tokens=8)
    run(a, s, turn1 + [40, 41, 42])          # the prompt, then fed-back generated tokens
    a.release(s)
    turn2 = turn1 + [40, 41, 42, 7, 8, 9]
    s2 = a.admit(turn2, tokens=12)
    assert s2.held == turn2[:4]


def test_unreferenced_cached_pages_are_evicted_least_recently_used_first():
    a = PageAllocator(pages=4, page=P)
    old, new = [1] * 8, [2] * 8
    for ids in (old, new):
        s = a.admit(ids, tokens=8)
        run(a, s, ids)
        a.release(s)
    assert a.stats()["pages_cached"] == 4 and a.stats()["pages_free"] == 0 and a.available() == 4
    s = a.admit([3] * 5, tokens=5)           # two pages: `old`'s, its tail first
    run(a, s, [3] * 5)
    assert a.evictions == 2
    assert a.match(old) == [] and len(a.match(new)) == 2
    a.release(s)
    s = a.admit(new + [0], tokens=9)         # still cached: mapped, and no longer evictable while mapped
    assert len(s.pages) == 2 and a.stats()["pages_cached"] == 1


def test_eviction_takes_the_tail_of_a_chain_before_its_head():
    a = PageAllocator(pages=3, page=P)
    ids = list(range(12))
    s = a.admit(ids, tokens=12)
    run(a, s, ids)
    a.release(s)
    t = a.admit([99] * 4, tokens=4)
    run(a, t, [99] * 4)
    assert len(a.match(ids)) == 2            # the chain's last page went, its first two still match


def test_exhaustion_waits_and_never_fitting_is_refused_by_name():
    a = PageAllocator(pages=6, page=P)
    s1 = a.admit([1, 2], tokens=16)          # 4 pages reserved
    assert a.available() == 2
    assert a.admit([3, 4], tokens=12) is None   # 3 pages: not now
    s2 = a.admit([3, 4], tokens=8)           # 2: fits
    assert s2 is not None and a.available() == 0
    a.release(s1)
    assert a.admit([3, 4], tokens=12) is not None   # after s1 left
    with pytest.raises(KVPoolTooSmallError, match="needs 7 KV pages .* holds 6 pages.*--kv-memory"):
        a.admit([1], tokens=25)


def test_cached_pages_count_as_available_but_mapped_ones_do_not():
    a = PageAllocator(pages=4, page=P)
    ids = list(range(9))
    s = a.admit(ids, tokens=9)
    run(a, s, ids)
    a.release(s)                             # 2 cached, 2 free
    assert a.available() == 4
    s2 = a.admit(ids, tokens=16)             # maps the 2 cached pages, reserves 2 more: exactly the pool
    assert s2 is not None and s2.reserved == 2 and a.available() == 0
    assert a.admit([7], tokens=1) is None


def test_reset_keeps_shared_pages_whole():
    a = PageAllocator(pages=4, page=P)
    s = a.admit([1], tokens=8)
    run(a, s, [1, 2, 3, 4, 5, 6])
    s.reset(5)
    assert s.held == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="shareable"):
        s.reset(2)
    with pytest.raises(ValueError):
        s.reset(9)
