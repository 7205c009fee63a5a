"""Beam search report (issue 11): on every reference prompt (tests/fixtures/<model>_transformers.json), the best
beam's cumulative logprob next to greedy decoding's over the same number of tokens (length_penalty 0, so the score is
the cum logprob), and the time per beam step beside the time per greedy decode step, measured in the same run. Lists
every prompt where the best beam scores below greedy (beam search does not guarantee it for K > 1). Not part of
`make test`.

    PYTHONPATH=. python tests/bench_beam.py [--model smollm2|gemma3] [-n 8] [--beams 2 3] [--prompts capital code]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--beams", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--prompts", nargs="*", default=None, help="prompt names (default: all but `long`)")
    a = ap.parse_args()

    from runtime_py.beam import BeamSpec, log_softmax
    from runtime_py.beam_sessions import beam_generate
    from runtime_py.cli import load
    model, _, tok, _ = load(a.model, 512, quiet=True)
    name = {"smollm2": "smollm2", "gemma3": "gemma3"}.get(a.model, a.model)
    cases = json.loads((FIXTURES / f"{name}_transformers.json").read_text())["cases"]
    cases = [c for c in cases if (c["name"] in a.prompts if a.prompts else c["name"] != "long")]
    eog = list(tok.eog_ids)
    ctx = max(len(c["prompt_ids"]) for c in cases) + a.n + 1
    sessions = [model.session(ctx) for _ in range(max(a.beams))]
    rows, exceptions = [], []
    for c in cases:
        ids = c["prompt_ids"]
        s = sessions[0]
        s.reset()
        s.forward(ids)
        g_cum, g_n, t0 = 0.0, 0, None
        while g_n < a.n:
            lp = log_softmax(s.logits())
            t = int(np.argmax(lp))
            if t in eog:
                g_cum += float(np.log(np.exp(lp[eog]).sum()))
                break
            g_cum += float(lp[t])
            g_n += 1
            if g_n < a.n:
                t0 = t0 or time.perf_counter()
                s.forward([t])
        greedy_ms = 1000 * (time.perf_counter() - t0) / max(g_n - 1, 1) if t0 else None
        row = {"prompt": c["name"], "greedy_cum": round(g_cum, 4), "greedy_tokens": g_n,
               "greedy_ms_per_step": round(greedy_ms, 1) if greedy_ms else None}
        for k in a.beams:
            *_, done = beam_generate(sessions[:k], tok, ids, BeamSpec(k, k, 0.0), max_tokens=a.n, eog_ids=eog,
                                     reuse=False)
            best = done.beams[0]
            row[f"K{k}"] = {"best_cum": round(best.cum_logprob, 4), "tokens": len(best.ids),
                            "finish": best.finish_reason, "ms_per_beam_step": done.timings["ms_per_beam_step"],
                            "kv_copies": done.timings["kv_copies"]}
            if best.cum_logprob < g_cum - 1e-6:
                exceptions.append((c["name"], k, best.cum_logprob, g_cum))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"model": a.model, "tokens": a.n, "prompts": len(rows),
                      "best_beam_below_greedy": exceptions}))


if __name__ == "__main__":
    main()
