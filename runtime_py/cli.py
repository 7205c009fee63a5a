"""kiln command line.

    kiln compile MODEL.gguf -o DIR          GGUF -> WGSL + shards + manifest  [--quant q8_0|q4g32|q4g64|q4g128]
    kiln compile MODEL [--force] [--verify] (re)build MODEL's entry in the artifact cache (what `run` uses)
    kiln run [MODEL] --prompt TEXT [--chat] [sampling flags] [--json] [--activations f32|int8]
    kiln run [MODEL] --prompt TEXT --beams K [--length-penalty A]   beam search: the K best continuations
    kiln chat [MODEL] [--system TEXT] [sampling flags]    interactive multi-turn chat (runtime_py/repl.py)
    kiln inspect MODEL.gguf [--ctx N]       architecture, parameters, tensor types, memory
    kiln serve [--host H] [--port P]        web demo + OpenAI-compatible API
    kiln export DIR [MODEL ...]             the web demo + models as static files for any web server or CDN

Every user error prints one line `kiln: error: ...` and exits 1; never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from compiler.errors import KilnError

from .cli_args import parser
from .model_info import cmd_inspect


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
    from compiler.manifest import read_manifest
    from compiler.output import check_target
    from compiler.pipeline import check_prefill_chunk, compile_model
    from .artifacts import add_selftest, check_model_arg, ensure_artifact, resolve_gguf
    check_model_arg(a.model)
    if a.output is None:      # the cache entry `kiln run MODEL` uses, built with the defaults
        if a.prefill_chunk is not None or a.quant or a.no_selftest:
            raise KilnError("--prefill-chunk, --quant and --no-selftest need -o DIR (the cache holds default builds)")
        out = ensure_artifact(a.model, progress=_bar("packing", unit_scale=False), force=a.force, verify=a.verify,
                              log=lambda *x: print(*x, file=sys.stderr))
    else:
        # only into a new, empty or kiln-made directory (compiler/output.py); checked before the GGUF is read
        check_target(Path(a.output))
        chunk = check_prefill_chunk(128 if a.prefill_chunk is None else a.prefill_chunk)
        # the self-test runs the staged artifact once, before it is moved into place: the browser compares its own
        # logits to these
        out = compile_model(resolve_gguf(a.model), Path(a.output), prefill_chunk=chunk,
                            progress=_bar("packing", unit_scale=False), requant=a.quant,
                            finish=None if a.no_selftest else add_selftest)
    m = read_manifest(out)
    size = sum(s["bytes"] for s in m["shards"])
    print(f"wrote {out}: {len(m['kernels'])} shaders, {len(m['shards'])} shards, {size / 2**20:.1f} MiB of weights")


def _sampling(a):
    from .sampling import SamplingParams
    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                          repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty, seed=a.seed,
                          stop=a.stop or [], max_tokens=a.max_tokens, **_constraint(a))


def _constraint(a) -> dict:
    """--json-schema FILE / --json-object / --grammar FILE (GBNF) / --regex RE -> SamplingParams fields
    (runtime_py/grammar.py); files are read here, so a missing or malformed one fails before the model loads."""
    out = {}
    if a.json_schema:
        try:
            schema = json.loads(read_utf8(a.json_schema, "--json-schema"))
        except json.JSONDecodeError as e:
            raise KilnError(f"--json-schema {a.json_schema}: not JSON ({e})") from None
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}
    if a.json_object:
        out["response_format"] = {"type": "json_object"}
    if a.grammar:
        out["grammar"] = read_utf8(a.grammar, "--grammar")
    if a.regex is not None:
        out["regex"] = a.regex
    return out


def load(model: str | None, ctx: int | None = None, quiet=False, verify=False):
    """(Model, Session, Tokenizer, manifest) for MODEL, compiling on first use. A cache entry found damaged while
    loading (a shard or shader that fails its hash) is rebuilt once; an artifact directory of the user's is not."""
    from compiler.errors import ArtifactError
    from .artifacts import ensure_artifact, is_cache_entry, rebuild_hint
    from .model import Model
    from .tokenizer import Tokenizer
    log = (lambda *x: None) if quiet else (lambda *x: print(*x, file=sys.stderr))
    art = ensure_artifact(model, progress=_bar("compiling", unit_scale=False), log=log, verify=verify)
    try:
        model_obj = Model(art, progress=_bar("loading"))
    except ArtifactError as e:
        if not is_cache_entry(art):
            raise ArtifactError(f"{e} (`{rebuild_hint(art)}`)") from None
        log(f"{e}; rebuilding the cache entry")
        art = ensure_artifact(model, progress=_bar("compiling", unit_scale=False), log=log, force=True)
        model_obj = Model(art, progress=_bar("loading"))
    if model_obj.activations_note:   # --activations int8 where it cannot run: float32 runs, and the user is told
        log(f"kiln: {model_obj.activations_note}")
    m = model_obj.manifest
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    return model_obj, model_obj.session(ctx), tok, m


def utf8_text(value: str, what: str) -> str:
    """`value` as given on the command line, refused if it is not valid UTF-8 (Python keeps undecodable argv bytes
    as lone surrogates, which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise KilnError(f"{what} is not valid UTF-8 text (undecodable byte at character {e.start}); kiln reads "
                        f"prompts as UTF-8") from None
    return value


def read_utf8(path: str | Path, what: str) -> str:
    data = Path(path).read_bytes()    # OSError: main prints it on one line
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"{what} {path}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"the prompt on standard input is not valid UTF-8 text (byte 0x{data[e.start]:02x} at "
                        f"offset {e.start})") from None


def build_prompt(tok, manifest, prompt: str, chat: bool, system: str | None, template_file: str | None = None,
                 parse_special: bool = False):
    if not chat:
        return tok.encode(prompt)
    from .chat import chat_prompt_ids
    template = read_utf8(template_file, "--chat-template") if template_file else None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_prompt_ids(tok, manifest, messages, template=template, parse_special=parse_special)


def cmd_run(a):
    from .generate import Done, generate
    if a.max_tokens is not None and a.max_tokens < 1:
        raise KilnError(f"--max-tokens must be at least 1 (got {a.max_tokens}); generation also stops at the end of "
                        f"the context (--ctx) and at the model's end-of-text token")
    params = _sampling(a).validate()   # bad flags fail before the model loads
    if a.speculate and a.draft:
        raise KilnError("--speculate and --draft both choose the drafter; give one")
    beams = _beams(a)
    from .artifacts import check_model_arg
    check_model_arg(a.model)
    for flag, value in (("--prompt", a.prompt), ("--system", a.system)):
        if value is not None:
            utf8_text(value, flag)
    if a.chat_template:
        read_utf8(a.chat_template, "--chat-template")   # a bad file fails before the model loads
    prompt = a.prompt if a.prompt is not None else read_stdin()
    model, session, tok, m = load(a.model, a.ctx, quiet=a.json, verify=a.verify)
    ids = build_prompt(tok, m, prompt, a.chat, a.system, a.chat_template, a.parse_special)
    if beams is not None:
        return _run_beams(a, beams, params, model, session, tok, m, ids)
    from .grammar import constraint_for
    constraint_for(params, tok)        # an engine-rejected grammar fails here, before prefill (then cached)
    drafter = _drafter(a, session, model)
    tops, done = [], None
    for ev in generate(session, tok, ids, params, logprobs=5 if a.json else 0,
                       eog_ids=tok.eog_ids, speculate=drafter):
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


# `kiln run` flags as beam.py check_request's request fields (the message names the flag)
BEAM_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
              "repeat_penalty": "--repeat-penalty", "presence_penalty": "--presence-penalty",
              "frequency_penalty": "--frequency-penalty", "stop": "--stop", "length_penalty": "--length-penalty",
              "n": "--beams", "best_of": "--beams", "response_format": "--json-schema / --json-object",
              "grammar": "--grammar", "regex": "--regex"}


def _beams(a):
    """--beams K [--length-penalty A] -> beam.py BeamSpec (K returned of K), or None; the sampling flags given
    explicitly, output constraints and speculation are refused with it, by flag."""
    from compiler.errors import InvalidParameterError
    from .beam import check_request
    req = {f: getattr(a, f) for f in getattr(a, "given", ())}     # flags given on the command line, as given
    req.update(use_beam_search=a.beams is not None, n=a.beams, best_of=a.beams, length_penalty=a.length_penalty,
               stop=a.stop, **_constraint(a))
    try:
        spec = check_request(req)
    except InvalidParameterError as e:
        raise KilnError(f"{BEAM_FLAGS.get(e.param, e.param)}: {e}") from None
    if spec is not None and (a.speculate or a.draft):
        raise KilnError(f"--beams and {'--speculate' if a.speculate else '--draft'}: beam search is not combined "
                        f"with speculative decoding")
    return spec


def _run_beams(a, spec, params, model, session, tok, m, ids):
    """kiln run --beams: the K best continuations, best first (text: one block each; --json: `beams`)."""
    from compiler.errors import ContextOverflowError
    from .beam_sessions import beam_generate
    if len(ids) >= session.ctx:
        raise ContextOverflowError(f"prompt is {len(ids)} tokens but the context holds {session.ctx} "
                                   f"(use a shorter prompt or a larger --ctx)")
    room = session.ctx - len(ids)
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    # the other beams' sessions hold at most this sequence (forks copy rows 0..pos)
    sessions = [session] + [model.session(len(ids) + max_tokens) for _ in range(spec.width - 1)]
    done = None
    for ev in beam_generate(sessions, tok, ids, spec, max_tokens=max_tokens, eog_ids=tok.eog_ids,
                            logprobs=5 if a.json else -1):
        done = ev
    if a.json:
        def tops(h):
            return [[{"id": i, "token": tok.decode([i]), "logprob": round(lp, 6)} for i, lp in alts]
                    for _, _, alts in h.logprobs]
        best = done.beams[0]
        print(json.dumps({"model": m["model"]["name"], "prompt_ids": ids, "ids": done.ids, "text": done.text,
                          "finish_reason": done.finish_reason, "top_logprobs": tops(best),
                          "beams": [{"ids": h.ids, "text": t, "cumulative_logprob": h.cum_logprob,
                                     "score": h.score, "finish_reason": h.finish_reason}
                                    for h, t in zip(done.beams, done.texts)],
                          "timings": done.timings}, ensure_ascii=False))
        return
    for i, (h, text) in enumerate(zip(done.beams, done.texts)):
        print(f"[beam {i + 1}/{len(done.beams)}: cumulative logprob {h.cum_logprob:.4f}, score {h.score:.4f}, "
              f"{h.finish_reason}]")
        print(text)
    t = done.timings
    print(f"[{t['prompt_tokens']} prompt tokens, {spec.width} beams, {t['beam_steps']} steps, {t['forwards']} "
          f"forwards, {t['kv_copies']} KV copies; ttft {t['ttft_s']:.2f}s, {t['ms_per_beam_step'] or 0:.0f} ms per "
          f"step]", file=sys.stderr)


def _drafter(a, session, model):
    """--speculate ngram|MODEL / --draft MODEL -> a drafter (runtime_py/speculate.py), or None."""
    spec = a.speculate or a.draft
    if spec is None:
        return None
    from .speculate import DRAFT_K, drafter_for
    k = DRAFT_K if a.draft_k is None else a.draft_k
    if not 1 <= k < model.manifest["limits"]["score_chunk"]:
        raise KilnError(f"--draft-k must be between 1 and {model.manifest['limits']['score_chunk'] - 1} (got {k})")
    return drafter_for(spec, session.ctx, model, k)


def cmd_chat(a):
    from .artifacts import check_model_arg
    from .repl import chat_loop
    if a.max_tokens is not None and a.max_tokens < 1:
        raise KilnError(f"--max-tokens must be at least 1 (got {a.max_tokens})")
    params = _sampling(a).validate()
    check_model_arg(a.model)
    if a.system is not None:
        utf8_text(a.system, "--system")
    template = read_utf8(a.chat_template, "--chat-template") if a.chat_template else None
    model, session, tok, m = load(a.model, a.ctx, verify=a.verify)
    chat_loop(session, tok, m, params, system=a.system, template=template, parse_special=a.parse_special)


def cmd_serve(a):
    from .server import serve
    if not 1 <= a.port <= 65535:
        raise KilnError(f"--port must be between 1 and 65535 (got {a.port})")
    serve(a)


def cmd_export(a):
    from .artifacts import DEFAULT_MODEL, ensure_artifact
    from .export import HEADERS, export_site
    from .server import WEB_DIR, _model_id
    artifacts = {}
    for spec in a.models or [DEFAULT_MODEL]:
        art = ensure_artifact(spec, progress=_bar("compiling", unit_scale=False),
                              log=lambda *x: print(*x, file=sys.stderr))
        model_id = _model_id(spec, art)
        if model_id in artifacts:
            raise KilnError(f"two models export as models/{model_id}/: {spec} and an earlier one")
        artifacts[model_id] = art
    out = export_site(Path(a.dir), WEB_DIR, artifacts, models_url=a.models_url)
    print(f"wrote {out}: {len(artifacts)} model(s): {', '.join(artifacts)}. Serve it with any static web server, "
          f"e.g. `python -m http.server -d {out}`; it must send " +
          ", ".join(f"{s} as {HEADERS[s].split(';')[0]}" for s in (".js", ".mjs", ".wgsl")) +
          " (README: Deploy; nginx: web/deploy/nginx.conf)")


def cmd_bench(a):
    from .bench import main as bench_main
    bench_main(a.args)


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "chat": cmd_chat, "inspect": cmd_inspect, "serve": cmd_serve,
            "export": cmd_export, "bench": cmd_bench}


def main(argv=None):
    a = parser().parse_args(argv)
    if getattr(a, "activations", None):   # read by every Model this process loads (runtime_py/model.py)
        os.environ["KILN_ACTIVATIONS"] = a.activations
    try:
        COMMANDS[a.cmd](a)
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
