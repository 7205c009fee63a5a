"""The `rows` program over the paged KV pool (runtime_py/rows.py): one forward over rows of several sequences equals
running each sequence alone — R decode rows against R sequential decodes (ids equal, logits within 1e-4 of the
`decode` program's), a mixed step (a prompt chunk beside decodes) against sequential runs, a row's logits bit for bit
the same whichever rows share its step (what makes batched serving give the ids of a request served alone), and a
sequence whose prompt begins with another's full pages maps them and gives the logits of a sequence computed whole."""
from __future__ import annotations

import numpy as np
import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

from runtime_py.rows import KVPool

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time there was a little", "Hello"]
CTX = 64


@pytest.fixture(scope="module")
def pool(smollm2_model):
    return KVPool(smollm2_model, ctx=CTX, kv_memory=f"{12 * CTX}tokens")


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [smollm2_tokenizer.encode(p) for p in PROMPTS]


def alone(model, ids):
    """A session of its own (not in the pool) after `ids`: (its greedy next token, its logits)."""
    s = model.session(CTX)
    s.forward(ids)
    return s, s.next_token(), s.logits()


def prefill(pool, ids):
    """A new sequence with `ids` prefilled through the rows program (its prompt rows, max_rows a forward, the last
    forward led by the last row): (sequence, greedy next token, logits of its last row)."""
    seq = pool.sequence(ids, max_new=8)
    rest = list(range(seq.pos, len(ids) - 1))
    while len(rest) >= pool.max_rows:
        pool.forward_rows([(seq, p, ids[p]) for p in rest[:pool.max_rows]], n_out=0)
        for p in rest[:pool.max_rows]:
            seq.append(ids[p])
        rest = rest[pool.max_rows:]
    out, logits = pool.forward_rows([(seq, len(ids) - 1, ids[-1])] + [(seq, p, ids[p]) for p in rest], n_out=1,
                                    logits_of=[0])
    for t in ids[seq.pos:]:
        seq.append(t)
    return seq, out[0], logits[0]


def test_decode_rows_equal_sequential_decodes(smollm2_model, pool, prompts):
    made = [prefill(pool, ids) for ids in prompts]
    seqs, firsts = [m[0] for m in made], [m[1] for m in made]
    ids, logits = pool.forward_rows([(s, s.pos, t) for s, t in zip(seqs, firsts)], logits_of=range(len(prompts)))
    for i, (ids_i, (seq, first, last)) in enumerate(zip(prompts, made)):
        ref, ref_first, ref_last = alone(smollm2_model, ids_i)
        assert ref_first == first, f"prompt {i}: the rows prefill differs from a session of its own"
        assert np.abs(last - ref_last).max() <= 1e-4, f"prompt {i}"
        ref.forward([first])                 # the `decode` program
        want = ref.logits()
        assert ids[i] == ref.next_token(), f"row {i}"
        err = np.abs(logits[i] - want).max()
        assert err <= 1e-4, f"row {i}: logits differ by {err}"
    for s in seqs:
        pool.release(s)


def test_mixed_step_equals_sequential_runs(smollm2_model, pool, prompts):
    """A 5-token prompt chunk (a new sequence, positions 0..4) beside 3 decode rows, in one forward laid out as the
    server lays it out: the rows that want a next token first (the decodes and the chunk's last token), the chunk's
    other rows after them, with no head (n_out)."""
    made = [prefill(pool, ids) for ids in prompts[:3]]
    out_rows = [(s, s.pos, t) for s, t, _ in made]
    chunk = prompts[2][:5]
    c = pool.sequence([], max_new=8)
    out_rows.insert(1, (c, 4, chunk[4]))   # the chunk's last row, before its own earlier positions
    ids, logits = pool.forward_rows(out_rows + [(c, p, t) for p, t in enumerate(chunk[:4])], n_out=4,
                                    logits_of=range(4))
    assert len(ids) == 4 and set(logits) == {0, 1, 2, 3}
    for t in chunk:
        c.append(t)
    # the chunk's last row against a prefill of the same tokens (prefill@cpu's matmuls read the same windows)
    cref = smollm2_model.session(CTX)
    cref.forward(chunk)
    assert ids[1] == cref.next_token()
    assert np.abs(logits[1] - cref.logits()).max() <= 1e-4
    for j, ids_j, (_, t, _) in zip([0, 2, 3], prompts, made):
        ref, _, _ = alone(smollm2_model, ids_j)
        ref.forward([t])
        assert ids[j] == ref.next_token(), f"decode row {j}"
        assert np.abs(logits[j] - ref.logits()).max() <= 1e-4, f"decode row {j}"
    # the chunk's K/V stayed in its pages: its next decode row equals a session of its own
    nxt, _ = pool.forward_rows([(c, len(chunk), ids[1])])
    cref.forward([ids[1]])
    assert nxt[0] == cref.next_token()
    assert pool.forward_rows([(c, 5, 9)], n_out=0) == ([], {})   # K/V only: no head, nothing read back
    for s in [c] + [m[0] for m in made]:
        pool.release(s)


def test_a_row_does_not_depend_on_its_neighbours(pool, prompts):
    """The same rows alone, in another order, and in a batch crossing an 8-row window: bit-identical logits."""
    seqs = [prefill(pool, ids)[0] for ids in prompts]
    rows = [(s, s.pos, 42 + i) for i, s in enumerate(seqs)]
    _, batch = pool.forward_rows(rows, logits_of=range(len(rows)))
    _, rev = pool.forward_rows(rows[::-1], logits_of=range(len(rows)))
    other = pool.sequence([], max_new=8)
    fill = [(other, p, 7) for p in range(6)]   # 6 rows of another sequence first: the others land in the second window
    _, late = pool.forward_rows(fill + rows, logits_of=range(6, 6 + len(rows)))
    for i, row in enumerate(rows):
        _, one = pool.forward_rows([row], logits_of=[0])
        assert np.array_equal(one[0], batch[i]), f"row {i}: alone vs in a batch"
        assert np.array_equal(rev[len(rows) - 1 - i], batch[i]), f"row {i}: batch order"
        assert np.array_equal(late[6 + i], batch[i]), f"row {i}: another x window"
    for s in seqs + [other]:
        pool.release(s)


def test_shared_prefix_pages_give_the_logits_of_a_whole_prefill(pool, smollm2_tokenizer):
    """A second sequence whose prompt begins with the first's two full pages maps them (no copy, no prefill) and
    prefills only the rest: its last row equals that of a sequence prefilled whole, bit for bit; once both are
    released the pool is back where it was, the full pages cached."""
    P = pool.page
    ids = smollm2_tokenizer.encode("Farm animals, in alphabetical order: chickens, cows, donkeys, goats, horses, "
                                   "pigs, rabbits, sheep and turkeys. Zoo animals, in alphabetical order: bears,")
    assert len(ids) > 2 * P + 1, "the prompt must fill two pages"
    before = pool.stats()
    whole, first, last = prefill(pool, ids)
    again, first2, last2 = prefill(pool, ids)
    assert again.pos == len(ids) and again.pages[:2] == whole.pages[:2] and again.pages[2] != whole.pages[2]
    assert first2 == first and np.array_equal(last2, last)
    assert pool.stats()["page_hits"] - before["page_hits"] == (len(ids) - 1) // P
    for s in (whole, again):
        pool.release(s)
    st = pool.stats()
    assert st["pages_used"] == before["pages_used"] and st["pages_reserved"] == before["pages_reserved"]
    assert st["pages_cached"] >= len(ids) // P


def test_refusals(pool):
    seq = pool.sequence([], max_new=2)
    with pytest.raises(ValueError, match="rows"):
        pool.forward_rows([])
    with pytest.raises(ValueError, match="n_out"):
        pool.forward_rows([(seq, 0, 1)], n_out=1, logits_of=[1])
    with pytest.raises(ValueError, match="sequence"):
        pool.forward_rows([(0, 0, 1)])
    from compiler.errors import ContextOverflowError
    with pytest.raises(ContextOverflowError):
        pool.forward_rows([(seq, CTX, 1)])
    pool.forward_rows([(seq, 0, 1)], n_out=0)
    seq.append(1)
    with pytest.raises(ValueError, match="append-only"):
        pool.forward_rows([(seq, 0, 1)])
    pool.release(seq)
    with pytest.raises(ValueError, match="live"):
        pool.forward_rows([(seq, 1, 1)])
