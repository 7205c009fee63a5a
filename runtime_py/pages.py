"""Paged KV: the page allocator behind the KV pool of `kiln serve` (runtime_py/rows.py `KVPool`). Pure Python.

The pool is `pages` pages of `page` positions each (limits.kv_page; the `rows` program reads and writes K/V through
each sequence's page table, compiler/kernels_rows.py). A sequence (`PagedSequence`) holds a list of pages: position j
is page pages[j // page], offset j % page.

    alloc = PageAllocator(pages=256, page=16)
    seq = alloc.admit(prompt_ids, tokens=len(prompt_ids) + max_tokens)   # None: not now (wait); raises: never fits
    seq.held, seq.pos                      # the leading prompt tokens found in cached pages (prefilled already)
    alloc.grow(seq, pos + 1)               # pages for positions < pos + 1 (from its reservation)
    seq.append(token)                      # after the forward that wrote its K/V: a page that fills is cached
    alloc.release(seq)                     # finished / stopped / disconnected: its pages go back at once

Sharing (prefix reuse, as vLLM's automatic prefix caching): a *full* page is content-addressed by its token prefix —
key = sha256(parent page's key + the page's tokens), a hash chain — and a new sequence whose prompt begins with
cached pages maps them (reference count + 1) and prefills only the rest. Full pages are append-only: a sequence only
ever writes positions past the pages it shares, so shared pages are never written and need no copy-on-write. `admit`
shares at most the pages that lie wholly before the prompt's last token (that token always runs: its logits pick the
first new token).

Reference counts: a page is *used* while a sequence maps it; when the last one lets go, a full (keyed) page becomes
*cached* — unreferenced, still findable by its key — and a partial one *free*. Allocation takes free pages first,
then evicts the least recently released cached page (its key forgotten); a sequence's pages are released last page
first, so a chain's tail is evicted before its head.

Reservation (no error mid-stream for an admitted request): `admit` reserves every page the sequence can come to need
(prompt + max_tokens, at most the context) and admits only what fits beside the reservations of running sequences;
pages are taken from the free / cached lists lazily, as the sequence grows, so cached pages stay findable until
really needed. A request that does not fit now waits (the scheduler keeps it queued); one that can never fit (more
pages than the pool holds) is refused by name (`KVPoolTooSmallError`, a 400).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from compiler.errors import ContextOverflowError

_ROOT = b"kiln-kv"   # the parent key of a sequence's first page


class KVPoolTooSmallError(ContextOverflowError):
    """A request needs more KV pages than the whole pool holds (--kv-memory): it could never run."""


def page_key(parent: bytes, tokens) -> bytes:
    """The content address of a full page: its parent's key (the tokens before it) and its own tokens."""
    return hashlib.sha256(parent + np.asarray(tokens, np.uint32).tobytes()).digest()


def pages_for(tokens: int, page: int) -> int:
    return -(-tokens // page)


class PagedSequence:
    """One sequence's pages and tokens. `held`: the token ids whose K/V its pages hold (pos = len(held)); `keys`:
    the key of each of its full pages (len(held) // page of them). What runtime_py/scheduler.py hands generate() as
    the session of a batched request (ctx, pos, held, reset)."""

    def __init__(self, alloc: "PageAllocator", ctx: int):
        self.alloc, self.ctx = alloc, ctx
        self.pages: list[int] = []
        self.keys: list[bytes] = []
        self.held: list[int] = []
        self.reserved = 0            # pages reserved for it and not taken yet
        self.released = False

    @property
    def pos(self) -> int:
        return len(self.held)

    def append(self, token: int):
        """The K/V of `token` at position pos is written (a forward ran it): hold it; a page it fills is keyed."""
        P = self.alloc.page
        if len(self.pages) * P <= self.pos:
            raise RuntimeError(f"internal: position {self.pos} has no page (grow first)")
        self.held.append(int(token))
        if self.pos % P == 0:
            i = self.pos // P - 1
            self.keys.append(page_key(self.keys[-1] if self.keys else _ROOT, self.held[i * P:]))
            self.alloc._register(self.pages[i], self.keys[-1])

    def reset(self, pos: int = 0):
        """Keep the first `pos` tokens (generate()'s prefix reuse asks for what `admit` already kept): only the
        pages past them can go, and a shared (full) page is never cut into."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"reset({pos}): the sequence holds {self.pos} tokens")
        if pos == self.pos:
            return
        if pos < len(self.keys) * self.alloc.page:
            raise RuntimeError(f"internal: reset({pos}) would cut into the sequence's full (shareable) pages")
        del self.held[pos:]


class PageAllocator:
    """Pages 0..pages-1 of `page` positions; see the module docstring."""

    def __init__(self, pages: int, page: int):
        if pages < 1 or page < 1:
            raise ValueError(f"a KV pool needs at least one page of at least one position (got {pages} x {page})")
        self.n_pages, self.page = pages, page
        self.ref = [0] * pages
        self.free: deque[int] = deque(range(pages))    # no content worth keeping
        self.cached: OrderedDict[int, None] = OrderedDict()   # full, unreferenced, oldest first (LRU)
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.reserved = 0                               # pages promised to admitted sequences, not taken yet
        self.hits = self.evictions = 0                  # pages found in the cache, cached pages evicted

    # -- counts (/health) ---------------------------------------------------------------------------------------
    def available(self) -> int:
        """Pages a new sequence could still reserve: free + cached, less the reservations."""
        return len(self.free) + len(self.cached) - self.reserved

    def stats(self) -> dict:
        used = self.n_pages - len(self.free) - len(self.cached)
        return {"page_tokens": self.page, "pages_total": self.n_pages, "pages_used": used,
                "pages_cached": len(self.cached), "pages_free": len(self.free), "pages_reserved": self.reserved,
                "pages_available": self.available(), "page_hits": self.hits, "page_evictions": self.evictions}

    # -- sequences ----------------------------------------------------------------------------------------------
    def match(self, ids) -> list[int]:
        """The cached pages holding the longest run of `ids`' leading full pages (a hash-chain walk)."""
        P, parent, out = self.page, _ROOT, []
        for i in range(len(ids) // P):
            key = page_key(parent, ids[i * P:(i + 1) * P])
            page = self.by_key.get(key)
            if page is None:
                break
            out.append(page)
            parent = key
        return out

    def need(self, tokens: int) -> int:
        """Pages a sequence of `tokens` positions takes; KVPoolTooSmallError when more than the pool holds."""
        n = pages_for(tokens, self.page)
        if n > self.n_pages:
            raise KVPoolTooSmallError(
                f"this request needs {n} KV pages ({tokens} tokens of prompt + max_tokens, {self.page} a page) but "
                f"the KV pool holds {self.n_pages} pages ({self.n_pages * self.page} tokens); ask for fewer "
                "max_tokens or start the server with a larger --kv-memory")
        return n

    def admit(self, prompt_ids, tokens: int, ctx: int | None = None) -> PagedSequence | None:
        """A sequence for `prompt_ids` that may grow to `tokens` positions, its prompt's cached pages mapped (at most
        those before the prompt's last token); None when its reservation does not fit now (wait for pages)."""
        total = self.need(tokens)
        shared = self.match(list(prompt_ids[:max(len(prompt_ids) - 1, 0)]))
        fresh = total - len(shared)
        if fresh > self.available() - sum(1 for p in shared if self.ref[p] == 0):
            return None
        seq = PagedSequence(self, ctx if ctx is not None else tokens)
        P = self.page
        for i, p in enumerate(shared):
            self._take(p)
            seq.pages.append(p)
            seq.keys.append(self.key_of[p])
            seq.held.extend(int(t) for t in prompt_ids[i * P:(i + 1) * P])
        self.hits += len(shared)
        seq.reserved = fresh
        self.reserved += fresh
        return seq

    def grow(self, seq: PagedSequence, n_tokens: int):
        """Pages for positions < n_tokens: from the sequence's reservation, then (past it) from what is available."""
        if seq.released:
            raise RuntimeError("internal: a released sequence cannot grow")
        while len(seq.pages) * self.page < n_tokens:
            if seq.reserved:
                seq.reserved -= 1
                self.reserved -= 1
            elif self.available() < 1:
                raise RuntimeError(f"internal: the KV pool has no page left for a sequence past its reservation "
                                   f"({len(seq.pages)} pages)")
            seq.pages.append(self._new_page())

    def release(self, seq: PagedSequence):
        """Give back the sequence's pages (last first: a chain's tail is evicted before its head) and reservation."""
        if seq.released:
            return
        seq.released = True
        self.reserved -= seq.reserved
        seq.reserved = 0
        for p in reversed(seq.pages):
            self.ref[p] -= 1
            if self.ref[p] == 0:
                if p in self.key_of:
                    self.cached[p] = None      # most recently used end
                else:
                    self.free.append(p)
        seq.pages = []

    # -- pages --------------------------------------------------------------------------------------------------
    def _take(self, p: int):
        if self.ref[p] == 0:
            self.cached.pop(p)
        self.ref[p] += 1

    def _new_page(self) -> int:
        if self.free:
            p = self.free.popleft()
        else:
            p, _ = self.cached.popitem(last=False)   # least recently used
            del self.by_key[self.key_of.pop(p)]
            self.evictions += 1
        self.ref[p] = 1
        return p

    def _register(self, p: int, key: bytes):
        """Page p is full with the content `key`: findable from now on (unless another page already holds it)."""
        if key not in self.by_key:
            self.by_key[key] = p
            self.key_of[p] = key


# ------------------------------------------------------------------------------------------------------------------
# sizing the pool: --kv-memory

DEFAULT_KV_SEQUENCES = 4     # with no --kv-memory: room for this many full-context sequences (kiln serve's slots)
DEFAULT_KV_MIB = 1024        # ... but at most this much (SmolLM2 135M at ctx 2048: 90 MiB a sequence)


def parse_kv_memory(text: str | int | None) -> tuple[str, int] | None:
    """--kv-memory: "512" or "512MiB" (MiB), "16384tokens" / "16384t" (tokens) -> ("mib" | "tokens", n)."""
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    for suffix, unit in (("tokens", "tokens"), ("token", "tokens"), ("t", "tokens"), ("mib", "mib"), ("m", "mib"),
                         ("", "mib")):
        if s.endswith(suffix):
            num = s[:len(s) - len(suffix)] if suffix else s
            if num.isdigit() and int(num) > 0:
                return unit, int(num)
            break
    from compiler.errors import KilnError
    raise KilnError(f"--kv-memory {text!r}: give MiB (e.g. 512 or 512MiB) or tokens (e.g. 16384tokens), above 0")


def kv_plan(bytes_per_token: int, page: int, ctx: int, kv_memory=None, sequences: int = DEFAULT_KV_SEQUENCES) -> dict:
    """The paged pool's size: {page_tokens, pages, tokens, bytes, bytes_per_token, full_context_sequences, ctx}.
    bytes_per_token: K + V of every layer for one position. Default (no kv_memory): `sequences` full contexts, at
    most DEFAULT_KV_MIB."""
    spec = parse_kv_memory(kv_memory)
    if spec is None:
        tokens = min(sequences * ctx, DEFAULT_KV_MIB * 2**20 // bytes_per_token)
    elif spec[0] == "tokens":
        tokens = spec[1]
    else:
        tokens = spec[1] * 2**20 // bytes_per_token
    pages = tokens // page
    if pages < 1:
        from compiler.errors import KilnError
        raise KilnError(f"--kv-memory {kv_memory}: less than one KV page ({page} tokens, "
                        f"{page * bytes_per_token / 2**20:.2f} MiB)")
    return {"page_tokens": page, "pages": pages, "tokens": pages * page, "bytes": pages * page * bytes_per_token,
            "bytes_per_token": bytes_per_token, "full_context_sequences": pages * page // ctx, "ctx": ctx}
