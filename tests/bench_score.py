"""The cost of one `score` pass (speculation's verify step, runtime_py/speculate.py) in decode steps, per pass size
T, for one or more compiled artifacts interleaved round by round (A/B in one process: a busy machine slows them
alike): wall time of an unprofiled pass (submit + the (T, vocab) logits readback, as Session.score_chunks) over that
of a decode step (submit + 4-byte readback) at the same position, medians over --reps rounds; with --profile, each
kernel's GPU time (timestamp queries) grouped by kernel family and weight. This is what PASS_COST is fitted from.
Not a test: numbers only.

    python tests/bench_score.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--reps 7] [--pos 216] [--T 1 2 4 6 8] [--profile]

(compile one with `kiln compile smollm2 -o DIR --no-selftest`).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import wgpu
from bench_attention import family, make_device
from wgpu.backends.wgpu_native.extras import write_timestamp

from compiler.schedule import dispatch_size
from runtime_py.model import Model


def label(step: dict) -> str:
    """matmul_cpu[ffn_down], matvec_cpu[lm_head], attention_cpu, ..."""
    w = [b.split("#")[0] for b in step["bind"] if "#" in b and "norm" not in b and "rope" not in b]
    t = w[0].split(".")[-2] if w else ""
    if t == "token_embd" or t == "output":
        t = "embd" if step["kernel"].startswith("embed") else "lm_head"
    return f"{family(step['kernel'])}[{t}]" if t else family(step["kernel"])


def profile(s, prog: str, pos: int, T: int) -> dict[str, float]:
    """GPU ms per label of one run of `prog` on T tokens at `pos` (steps the runtime skips for T are skipped)."""
    dev = s.model.device
    meta = s.model.manifest["programs"][s.model.program_for[prog]]
    live = [(st, m) for st, m in zip(s._program(prog), meta) if 0 not in [dispatch_size(x, T) for x in st[2]]]
    n = len(live)
    qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2 * n)
    qbuf = dev.create_buffer(size=16 * n, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    dev.queue.write_buffer(s.buffers["tokens"], 0, np.ones(T, np.uint32).tobytes())
    dev.queue.write_buffer(s.state, 0, np.array([T, pos, 0, 0], np.uint32).tobytes())
    enc = dev.create_command_encoder()
    cp = enc.begin_compute_pass()
    for i, ((pl, bg, d), _) in enumerate(live):
        cp.set_pipeline(pl)
        cp.set_bind_group(0, bg, [0])
        write_timestamp(cp, qs, 2 * i)
        cp.dispatch_workgroups(*(dispatch_size(x, T) for x in d))
        write_timestamp(cp, qs, 2 * i + 1)
    cp.end()
    enc.resolve_query_set(qs, 0, 2 * n, qbuf, 0)
    dev.queue.submit([enc.finish()])
    ts = np.frombuffer(dev.queue.read_buffer(qbuf), dtype=np.uint64).astype(np.int64)
    out = collections.defaultdict(float)
    for (_, m), ns in zip(live, ts[1::2] - ts[0::2]):
        out[label(m)] += ns / 1e6
    out["(all)"] = sum(out.values())
    out["(dispatches)"] = n
    return dict(out)


def wall_decode(s, pos: int) -> float:
    s.pos = pos
    del s.held[pos:]
    t = time.perf_counter()
    s._run("decode", [1])
    s.next_token()
    return 1e3 * (time.perf_counter() - t)


def wall_score(s, pos: int, T: int) -> float:
    s.pos = pos
    del s.held[pos:]
    t = time.perf_counter()
    next(iter(s.score_chunks([1] * T)))
    return 1e3 * (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pos", type=int, default=216, help="cache position of the pass (bench_speculate's prompt: ~216)")
    ap.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    ap.add_argument("--profile", action="store_true", help="also per-kernel GPU times (timestamp queries)")
    a = ap.parse_args(argv)
    dev = make_device()
    sessions = []
    for art in a.artifacts:
        s = Model(art, device=dev).session(ctx=a.pos + 64)
        s.forward(list(range(1, a.pos + 1)))   # a real cache up to pos; warm-up of prefill
        s.next_token()
        for T in a.T:                           # pipelines of every window the passes use
            wall_score(s, a.pos, T)
        wall_decode(s, a.pos)
        sessions.append(s)
    print(f"load average before {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    dec, sc, prof = collections.defaultdict(list), collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(a.reps):
        for i, s in enumerate(sessions):
            dec[i].append(wall_decode(s, a.pos))
            for T in a.T:
                sc[i, T].append(wall_score(s, a.pos, T))
                dec[i].append(wall_decode(s, a.pos))
            if a.profile:
                prof[i, "decode"].append(profile(s, "decode", a.pos, 1))
                for T in a.T:
                    prof[i, T].append(profile(s, "score", a.pos, T))
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for i, art in enumerate(a.artifacts):
        d = statistics.median(dec[i])
        cost = {T: statistics.median(sc[i, T]) / d for T in a.T}
        print(f"\n{art}: decode step {d:.1f} ms at pos {a.pos}; score pass in decode steps: "
              + ", ".join(f"T={T} {c:.2f}" for T, c in cost.items()))
        ts = np.array(a.T, float)
        c1, c0 = np.polyfit(ts - 1, [cost[T] for T in a.T], 1)   # k = T - 1 drafts
        print(f"  fit: pass of k drafts = {c0:.2f} + {c1:.3f} k decode steps")
        if a.profile:
            cols = ["decode"] + list(a.T)
            labels = sorted({k for c in cols for p in prof[i, c] for k in p},
                            key=lambda k: -statistics.median(p.get(k, 0) for p in prof[i, cols[-1]]))
            print("  GPU ms per pass: " + " ".join(f"{('T=' + str(c)) if c != 'decode' else c:>9s}" for c in cols))
            for k in labels:
                print(f"  {k:30s}" + " ".join(f"{statistics.median(p.get(k, 0.0) for p in prof[i, c]):9.2f}"
                                               for c in cols))


if __name__ == "__main__":
    main()
