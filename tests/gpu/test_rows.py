"""The `rows` program over a KV pool (runtime_py/rows.py): one forward over rows of several sequences equals running
each sequence alone — R decode rows against R sequential decodes (ids equal, logits within 1e-4 of the `decode`
program's), a mixed step (a prompt chunk beside decodes) against sequential runs, and a row's logits bit for bit the
same whichever rows share its step (what makes batched serving give the ids of a request served alone)."""
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
    return KVPool(smollm2_model, slots=len(PROMPTS) + 1, ctx=CTX)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [smollm2_tokenizer.encode(p) for p in PROMPTS]


def alone(model, ids):
    """A session of its own (not in the pool) after `ids`: (its greedy next token, its logits)."""
    s = model.session(CTX)
    s.forward(ids)
    return s, s.next_token(), s.logits()


def test_decode_rows_equal_sequential_decodes(smollm2_model, pool, prompts):
    sessions = [pool.session(i) for i in range(len(prompts))]
    firsts = []
    for s, ids in zip(sessions, prompts):   # each prompt prefilled alone, in its pool slot
        s.forward(ids)
        firsts.append(s.next_token())
    ids, logits = pool.forward_rows([(s.slot, s.pos, t) for s, t in zip(sessions, firsts)],
                                    logits_of=range(len(prompts)))
    for i, (ids_i, first) in enumerate(zip(prompts, firsts)):
        ref, ref_first, _ = alone(smollm2_model, ids_i)
        assert ref_first == first, f"prompt {i}: the pool slot's prefill differs from a session of its own"
        ref.forward([first])                 # the `decode` program
        want = ref.logits()
        assert ids[i] == ref.next_token(), f"row {i}"
        err = np.abs(logits[i] - want).max()
        assert err <= 1e-4, f"row {i}: logits differ by {err}"


def test_mixed_step_equals_sequential_runs(smollm2_model, pool, prompts):
    """A 5-token prompt chunk (slot 4, positions 0..4) beside 3 decode rows, in one forward laid out as the server
    lays it out: the rows that want a next token first (the decodes and the chunk's last token), the chunk's other
    rows after them, with no head (n_out)."""
    sessions = [pool.session(i) for i in range(3)]
    out_rows, decode_refs = [], []
    for s, ids in zip(sessions, prompts):
        s.forward(ids)
        t = s.next_token()
        out_rows.append((s.slot, s.pos, t))
        decode_refs.append((ids, t))
    chunk = prompts[2][:5]
    out_rows.insert(1, (4, 4, chunk[4]))   # the chunk's last row, before its own earlier positions
    ids, logits = pool.forward_rows(out_rows + [(4, p, t) for p, t in enumerate(chunk[:4])], n_out=4,
                                    logits_of=range(4))
    assert len(ids) == 4 and set(logits) == {0, 1, 2, 3}
    # the chunk's last row against a prefill of the same tokens (prefill@cpu's matmuls read the same windows)
    cref = smollm2_model.session(CTX)
    cref.forward(chunk)
    assert ids[1] == cref.next_token()
    assert np.abs(logits[1] - cref.logits()).max() <= 1e-4
    for j, (ids_j, t) in zip([0, 2, 3], decode_refs):
        ref, _, _ = alone(smollm2_model, ids_j)
        ref.forward([t])
        assert ids[j] == ref.next_token(), f"decode row {j}"
        assert np.abs(logits[j] - ref.logits()).max() <= 1e-4, f"decode row {j}"
    # the chunk's K/V stayed in slot 4: its next decode row equals a session of its own
    nxt, _ = pool.forward_rows([(4, len(chunk), ids[1])])
    cref.forward([ids[1]])
    assert nxt[0] == cref.next_token()
    assert pool.forward_rows([(4, 5, 9)], n_out=0) == ([], {})   # K/V only: no head, nothing read back


def test_a_row_does_not_depend_on_its_neighbours(pool, prompts):
    """The same rows alone, in another order, and in a batch crossing an 8-row window: bit-identical logits."""
    sessions = [pool.session(i) for i in range(len(prompts))]
    for s, ids in zip(sessions, prompts):
        s.forward(ids)
    rows = [(s.slot, s.pos, 42 + i) for i, s in enumerate(sessions)]
    _, batch = pool.forward_rows(rows, logits_of=range(len(rows)))
    _, rev = pool.forward_rows(rows[::-1], logits_of=range(len(rows)))
    fill = [(4, p, 7) for p in range(6)]   # 6 rows of slot 4 first: the others land in the second x window
    _, late = pool.forward_rows(fill + rows, logits_of=range(6, 6 + len(rows)))
    for i, row in enumerate(rows):
        _, one = pool.forward_rows([row], logits_of=[0])
        assert np.array_equal(one[0], batch[i]), f"row {i}: alone vs in a batch"
        assert np.array_equal(rev[len(rows) - 1 - i], batch[i]), f"row {i}: batch order"
        assert np.array_equal(late[6 + i], batch[i]), f"row {i}: another x window"


def test_refusals(pool):
    with pytest.raises(ValueError, match="rows"):
        pool.forward_rows([])
    with pytest.raises(ValueError, match="n_out"):
        pool.forward_rows([(0, 0, 1)], n_out=1, logits_of=[1])
    with pytest.raises(ValueError, match="slot"):
        pool.forward_rows([(99, 0, 1)])
    from compiler.errors import ContextOverflowError
    with pytest.raises(ContextOverflowError):
        pool.forward_rows([(0, CTX, 1)])
