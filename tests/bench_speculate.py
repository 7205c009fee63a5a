"""Speculative decoding bench (issue 11): decode tok/s of greedy with --speculate ngram (and a self-draft) over plain
greedy on a repetitive prompt: rewrite a ~200-token code block with one change. Reports ratios measured in the same
run, the acceptance rate, and whether the ids are identical (they must be). Not part of `make test`.

    PYTHONPATH=. python tests/bench_speculate.py [--model smollm2] [-n 64] [--k 5]
"""
from __future__ import annotations

import argparse
import json
import time

CODE = '''def parse_config(path):
    """Read a key = value file into a dict, skipping comments and blank lines."""
    result = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{number}: expected key = value")
            key, value = line.split("=", 1)
            key, value = key.strip(), value.strip()
            if key in result:
                raise ValueError(f"{path}:{number}: duplicate key {key}")
            result[key] = value
    return result
'''
PROMPT = (f"Here is a Python function:\n\n{CODE}\nRewrite it exactly, but rename the variable `result` to "
          f"`settings`. Only output the code.\n\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--self-draft", action="store_true", help="also the model as its own draft")
    a = ap.parse_args()
    from runtime_py.cli import build_prompt, load
    from runtime_py.generate import Done, generate
    from runtime_py.sampling import GREEDY
    from runtime_py.speculate import ModelDrafter, NgramDrafter
    model, session, tok, m = load(a.model, 1024, quiet=True)
    ids = build_prompt(tok, m, PROMPT, True, None, None, False)
    runs = [("plain", None), ("ngram", NgramDrafter(a.k))]
    if a.self_draft:
        runs.append(("self", ModelDrafter(model, 1024, "self", a.k)))
    out = {"model": a.model, "prompt_tokens": len(ids), "n": a.n}
    plain = None
    for name, d in runs:
        t0 = time.perf_counter()
        done = [e for e in generate(session, tok, ids, GREEDY, max_tokens=a.n, eog_ids=tok.eog_ids, speculate=d)
                if isinstance(e, Done)][0]
        wall = time.perf_counter() - t0
        r = {"decode_tok_s": done.timings["decode_tok_s"], "wall_s": round(wall, 2),
             "generated": len(done.ids), **{k: done.timings.get(k) for k in ("acceptance_rate", "passes",
                                                                            "draft_tokens", "accepted_tokens")}}
        if plain is None:
            plain = done
        else:
            r["same_ids"] = done.ids == plain.ids
            r["decode_speedup"] = round(done.timings["decode_tok_s"] / plain.timings["decode_tok_s"], 3)
        out[name] = r
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
