"""kiln command line.

    kiln compile MODEL.gguf -o DIR          GGUF -> WGSL + shards + manifest  [--quant q8_0|q4g32|q4g64|q4g128]
    kiln run [MODEL] --prompt TEXT [--chat] [sampling flags] [--json]
    kiln inspect MODEL.gguf [--ctx N]       architecture, parameters, tensor types, memory
    kiln serve [--host H] [--port P]        web demo + OpenAI-compatible API

Every user error prints one line `kiln: error: ...` and exits 1; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from compiler.errors import KilnError
from compiler.quant import REQUANT_TARGETS


def _bar(desc: str, unit_scale=True):
    """tqdm progress callback(done, total), drawn on stderr only when it is a terminal or forced."""
    from tqdm import tqdm
    state = {}

    def cb(done, total):
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="B" if unit_scale else "", unit_scale=unit_scale,
                                leave=False, file=sys.stderr, disable=not sys.stderr.isatty())
        b = state["bar"]
        b.update(done - b.n)
        if done >= total:
            b.close()
    return cb


def cmd_compile(a):
    from compiler.pipeline import compile_model
    from .artifacts import add_selftest, resolve_gguf
    target = Path(a.output)
    # compile replaces the output directory: never one that holds something other than a kiln artifact
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "manifest.json").exists())):
        raise KilnError(f"{target}: exists and is not a kiln artifact directory; choose a new or empty directory")
    out = compile_model(resolve_gguf(a.model), target, prefill_chunk=a.prefill_chunk,
                        progress=_bar("packing", unit_scale=False), requant=a.quant)
    if not a.no_selftest:
        add_selftest(out)   # runs the model once here: the browser compares its own logits to these
    m = json.loads((out / "manifest.json").read_text())
    size = sum(s["bytes"] for s in m["shards"])
    print(f"wrote {out}: {len(m['kernels'])} shaders, {len(m['shards'])} shards, {size / 2**20:.1f} MiB of weights")


def _sampling(a):
    from .sampling import SamplingParams
    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                          repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty, seed=a.seed,
                          stop=a.stop or [], max_tokens=a.max_tokens)


def load(model: str | None, ctx: int | None = None, quiet=False):
    """(Model, Session, Tokenizer, manifest) for MODEL, compiling on first use."""
    from .artifacts import ensure_artifact
    from .model import Model
    from .tokenizer import Tokenizer
    log = (lambda *x: None) if quiet else (lambda *x: print(*x, file=sys.stderr))
    art = ensure_artifact(model, progress=_bar("compiling", unit_scale=False), log=log)
    model_obj = Model(art, progress=_bar("loading"))
    m = model_obj.manifest
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    return model_obj, model_obj.session(ctx), tok, m


def build_prompt(tok, manifest, prompt: str, chat: bool, system: str | None, template_file: str | None = None):
    if not chat:
        return tok.encode(prompt)
    from .chat import render_chat
    template = Path(template_file).read_text() if template_file else manifest.get("chat_template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render_chat(template, messages, add_generation_prompt=True, bos_token=tok.info.get("bos_token") or "",
                       eos_token=tok.info.get("eos_token") or "", arch=manifest["model"]["arch"])
    return tok.encode(text)


def cmd_run(a):
    from .generate import Done, generate
    params = _sampling(a).validate()   # bad flags fail before the model loads
    model, session, tok, m = load(a.model, a.ctx, quiet=a.json)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    ids = build_prompt(tok, m, prompt, a.chat, a.system, a.chat_template)
    tops, done = [], None
    for ev in generate(session, tok, ids, params, logprobs=5 if a.json else 0,
                       eog_ids=tok.eog_ids):
        if isinstance(ev, Done):
            done = ev
        elif a.json:
            if ev.top_logprobs is not None:
                tops.append([{"id": i, "token": tok.decode([i]), "logprob": round(lp, 6)} for i, lp in ev.top_logprobs])
        else:
            print(ev.text, end="", flush=True)
    if a.json:
        print(json.dumps({"model": m["model"]["name"], "prompt_ids": ids, "ids": done.ids, "text": done.text,
                          "finish_reason": done.finish_reason, "top_logprobs": tops, "timings": done.timings},
                         ensure_ascii=False))
    else:
        print()
        t = done.timings
        print(f"[{t['prompt_tokens']} prompt tokens, {t['generated_tokens']} generated; ttft {t['ttft_s']:.2f}s, "
              f"prefill {t['prefill_tok_s']:.1f} tok/s, decode {t['decode_tok_s'] or 0:.1f} tok/s]", file=sys.stderr)


def cmd_inspect(a):
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    from .artifacts import resolve_gguf
    g = GGUFModel(resolve_gguf(a.model))
    cfg = read_config(g)
    n_params = sum(int(__import__("math").prod(t.shape)) for t in g.tensors.values())
    from compiler.pack import tensor_types
    types = Counter()
    for kind, nbytes in tensor_types(g, a.quant).values():   # as packed, after --quant re-quantization
        types[kind] += nbytes
    weights = sum(types.values())
    if a.ctx is not None and a.ctx < 1:
        raise KilnError(f"--ctx must be at least 1 (got {a.ctx})")
    ctx = a.ctx or cfg.context_length
    kv = cfg.kv_cache_bytes(ctx)
    info = {"file": str(g.path), "architecture": cfg.arch, "name": cfg.name, "parameters": n_params,
            "layers": cfg.n_layer, "n_embd": cfg.n_embd, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim, "n_ff": cfg.n_ff, "vocab": cfg.vocab, "context_length": cfg.context_length,
            "tensor_bytes_by_type": dict(types), "weights_bytes": weights, "ctx": ctx, "kv_cache_bytes_f32": kv,
            "total_gpu_bytes": weights + kv}
    if a.json:
        print(json.dumps(info, indent=1))
        return
    print(f"{g.path.name}: {cfg.arch} '{cfg.name}', {n_params / 1e6:.1f}M parameters")
    print(f"  {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads / {cfg.n_kv_head} KV heads, head_dim "
          f"{cfg.head_dim}, n_ff {cfg.n_ff}, vocab {cfg.vocab}, trained context {cfg.context_length}")
    for name, b in types.most_common():
        print(f"  {name:6s} {b / 2**20:9.2f} MiB")
    print(f"  weights on GPU      {weights / 2**20:9.2f} MiB (stays quantized)")
    print(f"  KV cache @ ctx {ctx:<5d} {kv / 2**20:9.2f} MiB (2 x {cfg.n_layer} layers x {cfg.n_kv_head} kv heads x "
          f"{cfg.head_dim} x {ctx} x 4 B)")
    print(f"  total               {(weights + kv) / 2**20:9.2f} MiB")


def cmd_serve(a):
    from .server import serve
    serve(a)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="LLM inference on WebGPU: compile GGUF models to WGSL, "
                                                          "run them natively or in the browser")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a GGUF model into WGSL shaders + weight shards + manifest")
    c.add_argument("model", help="path to a .gguf file or a known model name (smollm2, gemma3)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--prefill-chunk", type=int, default=128, help="tokens per prefill pass (multiple of 8)")
    c.add_argument("--no-selftest", action="store_true", help="skip recording reference logits (no GPU needed)")
    c.add_argument("--quant", choices=REQUANT_TARGETS, default=None,
                   help="re-quantize every F32/F16/Q8_0 matrix: q8_0, or int4 with one f16 scale per 32/64/128 weights")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="generate text")
    r.add_argument("model", nargs="?", default=None, help="GGUF path, artifact dir or model name (default smollm2)")
    r.add_argument("--prompt", "-p", help="prompt text (default: read stdin)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--system", help="system message (with --chat)")
    r.add_argument("--chat-template", help="jinja chat template file overriding the model's")
    # sampling flags: defaults are SamplingParams' (runtime_py/sampling.py REQUEST_TABLE), the API's and the browser's
    from .sampling import SamplingParams
    d = SamplingParams()
    r.add_argument("--max-tokens", "-n", type=int, default=d.max_tokens,
                   help="tokens to generate (default: until EOS, a stop string or the end of the context)")
    r.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    r.add_argument("--top-k", type=int, default=d.top_k, help=f"<= 0 = off (default {d.top_k})")
    r.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    r.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off (default {d.min_p})")
    r.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help="1 = off (llama.cpp default)")
    r.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help=f"tokens the penalties look at; 0 = off, -1 = all (default {d.repeat_last_n})")
    r.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    r.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--ctx", type=int, default=None, help="context length (default 2048, at most the model's)")
    r.add_argument("--json", action="store_true", help="print one JSON object: model, prompt_ids, ids, text, "
                                                       "finish_reason, top_logprobs, timings (schema: "
                                                       "tests/gpu/test_cli.py)")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="describe a GGUF model and its memory needs")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--ctx", type=int, default=None)
    i.add_argument("--quant", choices=REQUANT_TARGETS, default=None, help="show sizes after `compile --quant`")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("serve", help="serve the web demo and the OpenAI-compatible API")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", action="append", help="model to serve (repeatable; default smollm2)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    s.add_argument("--ctx", type=int, default=None)
    s.set_defaults(fn=cmd_serve)
    b = sub.add_parser("bench", add_help=False, help="dispatches / submits / bytes per token, tok/s at positions 100 "
                                                     "and 1000, roofline, llama.cpp beside it (see runtime_py/bench.py)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(fn=lambda a: __import__("runtime_py.bench", fromlist=["main"]).main(a.args))
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        a.fn(a)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nkiln: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as e:   # unreadable / unwritable paths the user named (--chat-template, -o, ...)
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
