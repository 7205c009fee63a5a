"""Where a `rows` forward's time goes on this adapter: wall time of KVPool.forward_rows at R rows, and GPU time per
kernel family (timestamp queries around every dispatch of `rows` + `rows_head`), for one or more artifacts.

    python tests/bench_rows.py                              # smollm2 (compiled into KILN_CACHE on first use)
    python tests/bench_rows.py ART_DIR_A ART_DIR_B --rows 1,16 --reps 5     # A/B of two compiled artifacts

R decode rows of R sequences, each with a `--pos`-token prompt already in the pool (ids 100..), at that position.
Artifacts are interleaved round-robin over `--reps` rounds, so a busy machine slows them alike; medians are reported
with the load average. Not a test: numbers only (the correctness of the rows program is tests/gpu/test_rows*.py).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import wgpu
from wgpu.backends.wgpu_native.extras import write_timestamp

import runtime_py.device as device
from compiler.schedule import dispatch_size

QUERIES = 4096   # wgpu's most queries per query set: a forward's ~2000 dispatches take several


def timestamp_device():
    """runtime_py.device's device, with the timestamp features added (the process-wide one the Model uses)."""
    ad = device.get_adapter()
    lim = ad.limits
    wanted = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                  "max-storage-buffers-per-shader-stage", "max-compute-workgroup-storage-size",
                                  "max-compute-invocations-per-workgroup", "max-compute-workgroup-size-x",
                                  "max-compute-workgroup-size-y") if k in lim}
    feats = [f for f in device.OPTIONAL_FEATURES if f in ad.features]
    feats += ["timestamp-query", "timestamp-query-inside-passes"]
    device._device = ad.request_device_sync(required_features=feats, required_limits=wanted)


def setup(art: Path, n_seq: int, pos: int):
    """(model, pool, sequences): n_seq sequences with `pos` prompt tokens each written to the pool."""
    from runtime_py.model import Model
    from runtime_py.rows import KVPool
    model = Model(art)
    pool = KVPool(model, ctx=max(256, 2 * pos), kv_memory=f"{n_seq * max(256, 2 * pos)}tokens")
    ids = [100 + i for i in range(pos)]
    seqs = []
    for _ in range(n_seq):
        s = pool.sequence(ids, max_new=64)
        for p0 in range(s.pos, pos, pool.max_rows):   # past the full pages it shares with the first sequence
            pool.forward_rows([(s, p, ids[p]) for p in range(p0, min(pos, p0 + pool.max_rows))], n_out=0)
        for t in ids[s.pos:]:
            s.append(t)
        seqs.append(s)
    return model, pool, seqs


def family(kernel: str) -> str:
    """A step's kernel name -> its family: every matmul together, else the template's name."""
    if kernel.startswith(("matmul", "matvec")):
        return "matmul"
    return kernel.split("_wg")[0].split("_group")[0].split("_norm")[0].split("_neox")[0]


def kernel_times(model, pool, rows) -> dict[str, float]:
    """ms per kernel family of one forward over `rows` (rows + rows_head, as KVPool.forward_rows encodes them)."""
    from runtime_py.model import UNIFORM_ALIGN
    R, r, dev = len(rows), pool.runner, model.device
    steps = [(0, st) for st in r._program("rows")] + [(1, st) for st in r._program("rows_head")]
    progs = model.manifest["programs"]
    names = [s["kernel"] for p in ("rows", "rows_head") for s in progs[model.program_for[p]]]
    per_set = QUERIES // 2
    n_sets = -(-len(steps) // per_set)
    sets = [dev.create_query_set(type=wgpu.QueryType.timestamp, count=2 * per_set) for _ in range(n_sets)]
    bufs = [dev.create_buffer(size=16 * per_set, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
            for _ in range(n_sets)]
    pool.forward_rows(rows)   # writes the tokens, row info, page tables and State records this replay reads
    enc = dev.create_command_encoder()
    cp = enc.begin_compute_pass()
    for i, (slot, (pipeline, bind_group, dispatch)) in enumerate(steps):
        qs, j = sets[i // per_set], i % per_set
        size = [dispatch_size(d, R) for d in dispatch]
        write_timestamp(cp, qs, 2 * j)
        if 0 not in size:
            cp.set_pipeline(pipeline)
            cp.set_bind_group(0, bind_group, [slot * UNIFORM_ALIGN])
            cp.dispatch_workgroups(*size)
        write_timestamp(cp, qs, 2 * j + 1)
    cp.end()
    for qs, b in zip(sets, bufs):
        enc.resolve_query_set(qs, 0, 2 * per_set, b, 0)
    dev.queue.submit([enc.finish()])
    ts = np.concatenate([np.frombuffer(dev.queue.read_buffer(b), np.uint64).astype(np.int64) for b in bufs])
    per = (ts[1::2] - ts[0::2])[:len(steps)]
    out = collections.Counter()
    for name, t in zip(names, per):
        out[family(name)] += t / 1e6
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", help="compiled artifact directories (default: smollm2's)")
    ap.add_argument("--rows", default="1,4,16", help="rows per forward, comma-separated")
    ap.add_argument("--pos", type=int, default=20, help="prompt tokens of every sequence before its decode row")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    Rs = [int(x) for x in args.rows.split(",")]
    timestamp_device()
    if args.artifacts:
        arts = [Path(a) for a in args.artifacts]
    else:
        from runtime_py.artifacts import ensure_artifact
        arts = [ensure_artifact("smollm2", log=lambda *a: print(*a, file=sys.stderr))]
    runs = [setup(a, max(Rs), args.pos) for a in arts]
    walls, kern = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(args.reps):
        for ai, (model, pool, seqs) in enumerate(runs):
            for R in Rs:
                rows = [(s, s.pos, 7) for s in seqs[:R]]
                t = time.perf_counter()
                pool.forward_rows(rows)
                walls[ai, R].append(time.perf_counter() - t)
                kern[ai, R].append(kernel_times(model, pool, rows))
    print(f"load average {os.getloadavg()[0]:.2f}; decode rows at position {args.pos}; medians of {args.reps}")
    for ai, art in enumerate(arts):
        print(f"{art}")
        for R in Rs:
            w = statistics.median(walls[ai, R])
            fams = kern[ai, R][0].keys()
            ms = {f: statistics.median(k[f] for k in kern[ai, R]) for f in fams}
            top = ", ".join(f"{f} {v:.0f}" for f, v in sorted(ms.items(), key=lambda x: -x[1]) if v >= 1)
            print(f"  R={R:3d}: forward_rows {w * 1e3:7.0f} ms ({R / w:5.1f} rows/s)   GPU ms: {top}")


if __name__ == "__main__":
    main()
