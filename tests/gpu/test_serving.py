"""Prefix reuse on the GPU (runtime_py/kvcache.py through runtime_py/generate.py): a session that already holds a
prompt's leading tokens prefills only the rest, and the greedy ids are exactly those of a fresh session without
reuse — for a shared system-prompt-like prefix and for the second turn of a chat. Prompts are short: on lavapipe a
prompt token costs about as much as a decode step."""
from __future__ import annotations

import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

from runtime_py.chat import chat_prompt_ids
from runtime_py.generate import Done, generate
from runtime_py.sampling import GREEDY

N = 4
PREFIX = "A list of animals that live on farms: cows, sheep, goats, pigs,"


def run(session, tok, ids, reuse=True, n=N) -> Done:
    return [ev for ev in generate(session, tok, ids, GREEDY, max_tokens=n, eog_ids=tok.eog_ids, reuse=reuse)
            if isinstance(ev, Done)][0]


@pytest.fixture(scope="module")
def fresh(smollm2_model):
    """Greedy ids without reuse, on a session of its own (reset to 0 before each prompt)."""
    s = smollm2_model.session(256)
    return lambda tok, ids: run(s, tok, ids, reuse=False)


def test_shared_prefix_is_not_prefilled_again(smollm2_model, smollm2_tokenizer, fresh):
    tok = smollm2_tokenizer
    a, b = tok.encode(PREFIX + " horses"), tok.encode(PREFIX + " and chickens")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    s = smollm2_model.session(256)
    da = run(s, tok, a)
    assert da.timings["cached_tokens"] == 0
    assert s.held == a + da.ids[:-1]                           # the last sampled token was never fed back
    db = run(s, tok, b)
    assert shared - 1 <= db.timings["cached_tokens"] <= shared  # at most one token given back (kvcache.reusable)
    assert db.ids == fresh(tok, b).ids
    assert da.ids == fresh(tok, a).ids
    again = run(s, tok, b)                                     # the same prompt again: all but its tail cached
    assert again.timings["cached_tokens"] >= len(b) - 2 and again.ids == db.ids


def test_second_chat_turn_prefills_only_the_new_message(smollm2_model, smollm2_tokenizer, smollm2_artifact, fresh):
    import json
    tok = smollm2_tokenizer
    manifest = json.loads((smollm2_artifact / "manifest.json").read_text())
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    ids1 = chat_prompt_ids(tok, manifest, turn1)
    s = smollm2_model.session(256)
    d1 = run(s, tok, ids1)
    turn2 = turn1 + [{"role": "assistant", "content": d1.text}, {"role": "user", "content": "Another?"}]
    ids2 = chat_prompt_ids(tok, manifest, turn2)
    d2 = run(s, tok, ids2)
    assert d2.timings["cached_tokens"] >= len(ids1)            # the whole first turn stayed in the cache
    assert d2.ids == fresh(tok, ids2).ids


def test_reset_forgets(smollm2_model, smollm2_tokenizer):
    s = smollm2_model.session(64)
    ids = smollm2_tokenizer.encode("Hello there")
    s.forward(ids)
    assert s.held == ids and s.pos == len(ids)
    s.reset(1)
    assert s.held == ids[:1] and s.pos == 1
    with pytest.raises(ValueError):
        s.reset(5)
    s.reset()
    assert s.held == [] and s.pos == 0


def test_kiln_chat_multi_turn_ctrl_c_stops_a_reply_not_the_program(smollm2_artifact):
    """Two turns through `kiln chat`; Ctrl-C (SIGINT) once each reply has begun. The program goes on to the next
    turn, whose stats line shows the first turn cached; /reset forgets; end of input leaves with status 0."""
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-m", "runtime_py.cli", "chat", str(smollm2_artifact), "--temperature",
                          "0", "-n", "40", "--ctx", "512", "--system", "Be brief."], cwd=root,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), []

    def pump_out():
        for chunk in iter(lambda: p.stdout.read1(64), b""):
            out.extend(chunk)

    def pump_err():
        for line in iter(p.stderr.readline, b""):
            err.append(line.decode())
    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()

    def wait_for(cond, what, timeout=600):
        deadline = time.time() + timeout
        while not cond():
            assert time.time() < deadline and p.poll() is None, f"kiln chat: no {what}; stderr: {''.join(err)}"
            time.sleep(0.05)
    n_stats = lambda: sum("prompt tokens" in line for line in err)     # noqa: E731
    try:
        for i, line in enumerate((b"Tell me a long story about a dragon.\n", b"Thanks! Another one?\n")):
            n0 = len(out)
            p.stdin.write(line)
            p.stdin.flush()
            wait_for(lambda: len(out) > n0, "reply")                  # the reply has begun streaming
            p.send_signal(signal.SIGINT)
            wait_for(lambda: n_stats() > i, "stats line")             # it ended; the program is still there
        p.stdin.write(b"/reset\n")
        p.stdin.close()
        p.wait(timeout=120)
        for t in threads:
            t.join(10)
    finally:
        p.kill()
    err = "".join(err)
    assert p.returncode == 0, err
    stats = re.findall(r"\[(\d+) prompt tokens, (\d+) cached · (\d+) generated .* stopped\]", err)
    assert len(stats) == 2, err
    (p1, c1, g1), (p2, c2, g2) = [tuple(map(int, s)) for s in stats]
    assert c1 == 0 and 1 <= g1 < 40 and 1 <= g2 < 40, err
    assert c2 >= p1, err                                       # turn 2 prefilled only its own tokens
    assert "[conversation forgotten]" in err
