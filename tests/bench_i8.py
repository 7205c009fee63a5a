"""Decode and prefill speed of the int8-activation path next to the f32 one, interleaved in one process (ratios only:
the machine is shared).

    .venv/bin/python tests/bench_i8.py [--rounds 4] [--pos 100]

Both Models (activations f32 and int8) on the same artifact and device; each round times 8 GPU-sampled decode steps
(one submit, as generate() runs them) and one 64-token prefill per model, alternating; the fastest round is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pos", type=int, default=100)
    a = ap.parse_args(argv)
    from runtime_py.artifacts import ensure_artifact
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    art = ensure_artifact("smollm2", log=lambda *x: print(*x, file=sys.stderr))
    sessions = {}
    for act in ("f32", "int8"):
        m = Model(art, activations=act)
        assert m.activations == act, m.activations_note
        s = m.session(ctx=a.pos + 256)
        s.begin_sampling(GREEDY, [], 0)
        s.prefill_sample(list(range(10, 10 + a.pos)))
        s.decode_sample(2)   # warm-up
        sessions[act] = s
    best = {act: [1e9, 1e9] for act in sessions}
    for _ in range(a.rounds):
        for act, s in sessions.items():
            s.reset(a.pos)
            t = time.perf_counter()
            s.decode_sample(8)
            best[act][0] = min(best[act][0], (time.perf_counter() - t) / 8)
            s.reset(a.pos)
            t = time.perf_counter()
            s.forward(list(range(200, 264)))
            s.next_token()
            best[act][1] = min(best[act][1], (time.perf_counter() - t) / 64)
    f = best["f32"]
    for act, (d, p) in best.items():
        print(f"{act:5s} decode {1 / d:6.2f} tok/s ({f[0] / d:.2f}x f32)   prefill {1 / p:6.2f} tok/s ({f[1] / p:.2f}x f32)"
              f"   at position {a.pos}")


if __name__ == "__main__":
    main()
