"""Speculative decoding bench (issue 11): decode tok/s of greedy with --speculate ngram over plain greedy on a
repetitive prompt (rewrite a ~200-token code block with one change), in one process, the variants interleaved
(plain, ngram, ngram, plain, ...: ABBA rounds, so a drift in the machine's load hits both alike) after a warm-up of
each. Prints per variant the median decode tok/s, the acceptance rate, target passes and tokens per pass; the
speed-up as the ratio of medians and per round; whether every run's ids equal plain greedy's (they must); the load
average before and after. Not part of `make test`.

    PYTHONPATH=. python tests/bench_speculate.py [--model smollm2] [-n 128] [--rounds 2] [--k 5 7] [--self-draft]

--check-refs: instead, every reference prompt of the model (tests/fixtures/<model>_transformers.json): plain greedy
and ngram speculation, -n tokens each; prints whether the ids are identical, the acceptance rate, passes, tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

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


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-n", type=int, default=128, help="tokens per generation")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs every variant twice)")
    ap.add_argument("--k", type=int, nargs="+", default=[7], help="most tokens per draft (one variant each)")
    ap.add_argument("--fixed", action="store_true", help="fixed k (no adaptation from the acceptance rate)")
    ap.add_argument("--self-draft", action="store_true", help="also the model as its own draft (acceptance 100%%)")
    ap.add_argument("--check-refs", action="store_true", help="the reference prompts instead (ids + acceptance)")
    a = ap.parse_args()
    if a.check_refs:
        return check_refs(a)
    from runtime_py.cli import build_prompt, load
    from runtime_py.generate import Done, generate
    from runtime_py.sampling import GREEDY
    from runtime_py.speculate import ModelDrafter, NgramDrafter
    model, session, tok, m = load(a.model, 1024, quiet=True)
    ids = build_prompt(tok, m, PROMPT, True, None, None, False)
    variants = {"plain": lambda: None}
    for k in a.k:
        variants[f"ngram_k{k}"] = lambda k=k: NgramDrafter(k, adaptive=not a.fixed)
    if a.self_draft:
        variants["self"] = lambda: ModelDrafter(model, 1024, "self", a.k[0])
    out = {"model": a.model, "prompt_tokens": len(ids), "n": a.n, "rounds": a.rounds,
           "adapter": model.device.adapter.info.get("device"), "load_before": load_avg()}

    def run(name, n):
        evs = generate(session, tok, ids, GREEDY, max_tokens=n, eog_ids=tok.eog_ids, speculate=variants[name]())
        return [e for e in evs if isinstance(e, Done)][0]

    for name in variants:   # warm-up: pipelines, the score program's buffers, the prompt's prefix in the cache
        run(name, 8)
    runs = {name: [] for name in variants}
    order = list(variants)
    for r in range(a.rounds):
        for name in order + order[::-1]:
            runs[name].append(run(name, a.n))
    plain = runs["plain"][0].ids
    for name, done in runs.items():
        tps = [d.timings["decode_tok_s"] for d in done]
        t = done[0].timings
        row = {"decode_tok_s": tps, "median": statistics.median(tps), "generated": len(done[0].ids),
               "same_ids_as_plain": all(d.ids == plain for d in done)}
        if name != "plain":
            row.update({k: t.get(k) for k in ("acceptance_rate", "passes", "draft_tokens", "accepted_tokens")})
            row["tokens_per_pass"] = round(len(done[0].ids) / max(t["passes"], 1), 2)
            row["speedup"] = round(row["median"] / statistics.median(d.timings["decode_tok_s"] for d in runs["plain"]),
                                   3)
            row["speedup_per_run"] = [round(x / y.timings["decode_tok_s"], 3) for x, y in zip(tps, runs["plain"])]
        out[name] = row
    out["load_after"] = load_avg()
    print(json.dumps(out, indent=1))


def check_refs(a):
    from pathlib import Path
    from runtime_py.artifacts import ensure_artifact
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.speculate import NgramDrafter
    from runtime_py.tokenizer import Tokenizer
    fixture = Path(__file__).parent / "fixtures" / f"{a.model}_transformers.json"
    art = ensure_artifact(a.model, log=lambda *x: None)
    model = Model(art)
    tok = Tokenizer(art / model.manifest["tokenizer"]["file"], model.manifest["tokenizer"])
    out = {"model": a.model, "n": a.n, "load_before": load_avg(), "prompts": {}}
    for case in json.loads(fixture.read_text())["cases"]:
        ids, s = case["prompt_ids"], model.session(ctx=1024)
        plain = [e for e in generate(s, tok, ids, GREEDY, max_tokens=a.n) if isinstance(e, Done)][0]
        spec = [e for e in generate(s, tok, ids, GREEDY, max_tokens=a.n, speculate=NgramDrafter(a.k[0]))
                if isinstance(e, Done)][0]
        t = spec.timings
        out["prompts"][case["name"]] = {
            "same_ids": spec.ids == plain.ids, "acceptance_rate": t["acceptance_rate"], "passes": t["passes"],
            "draft_tokens": t["draft_tokens"], "plain_tok_s": plain.timings["decode_tok_s"],
            "ngram_tok_s": t["decode_tok_s"]}
    out["all_same_ids"] = all(p["same_ids"] for p in out["prompts"].values())
    out["load_after"] = load_avg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
