"""kiln's command-line flags: one argparse parser, every subcommand (runtime_py/cli.py runs them: `COMMANDS`)."""
from __future__ import annotations

import argparse

from compiler.quant import REQUANT_TARGETS
from compiler.schedule_i8 import ACTIVATIONS


class _Given(argparse.Action):
    """Stores the value and records that the flag was given (`namespace.given`): --beams refuses sampling flags
    given explicitly, even at their default value."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def _sampling_flags(r):
    """Sampling flags of run and chat; defaults are SamplingParams' (runtime_py/sampling.py REQUEST_TABLE), the
    API's and the browser's."""
    from .sampling import SamplingParams
    d = SamplingParams()
    r.add_argument("--max-tokens", "-n", type=int, default=d.max_tokens,
                   help="tokens to generate (default: until EOS, a stop string or the end of the context)")
    r.add_argument("--temperature", type=float, default=d.temperature, action=_Given,
                   help=f"0 = greedy (default {d.temperature})")
    r.add_argument("--top-k", type=int, default=d.top_k, action=_Given, help=f"<= 0 = off (default {d.top_k})")
    r.add_argument("--top-p", type=float, default=d.top_p, action=_Given, help=f"1 = off (default {d.top_p})")
    r.add_argument("--min-p", type=float, default=d.min_p, action=_Given, help=f"0 = off (default {d.min_p})")
    r.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, action=_Given,
                   help="1 = off (llama.cpp default)")
    r.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help=f"tokens the penalties look at; 0 = off, -1 = all (default {d.repeat_last_n})")
    r.add_argument("--presence-penalty", type=float, default=d.presence_penalty, action=_Given)
    r.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty, action=_Given)
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")


def _activations_flag(p):
    p.add_argument("--activations", choices=ACTIVATIONS, default=None, help="f32 (default, exact) or int8: CPU adapters "
                   "quantise mat-vec inputs to 8 bits per 32-block and use integer dot products (faster, approximate; "
                   "env KILN_ACTIVATIONS)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="LLM inference on WebGPU: compile GGUF models to WGSL, "
                                                          "run them natively or in the browser")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a GGUF model into WGSL shaders + weight shards + manifest")
    c.add_argument("model", help="path to a .gguf file or a known model name (smollm2, gemma3)")
    c.add_argument("-o", "--output", default=None,
                   help="output directory: new, empty, or an artifact kiln wrote (default: the artifact cache)")
    c.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill pass (multiple of 8; "
                                                                   "default 128)")
    c.add_argument("--force", action="store_true", help="rebuild the cache entry even if it looks whole (no -o)")
    c.add_argument("--verify", action="store_true", help="hash the GGUF and the cache entry's files again (no -o)")
    c.add_argument("--no-selftest", action="store_true", help="skip recording reference logits (no GPU needed)")
    c.add_argument("--quant", choices=REQUANT_TARGETS, default=None,
                   help="re-quantize every F32/F16/Q8_0 matrix: q8_0, or int4 with one f16 scale per 32/64/128 weights")

    r = sub.add_parser("run", help="generate text")
    r.add_argument("model", nargs="?", default=None, help="GGUF path, artifact dir or model name (default smollm2)")
    r.add_argument("--prompt", "-p", help="prompt text (default: read stdin)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--system", help="system message (with --chat)")
    r.add_argument("--chat-template", help="jinja chat template file overriding the model's")
    r.add_argument("--parse-special", action="store_true", help="with --chat: control-token text in the messages "
                   "(e.g. <|im_end|>) becomes control tokens, as in llama.cpp (default: plain text)")
    _sampling_flags(r)
    r.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this JSON Schema")
    r.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    r.add_argument("--grammar", metavar="FILE", help="constrain the output to this GBNF grammar (llama.cpp's format)")
    r.add_argument("--regex", help="constrain the output to match this regular expression")
    r.add_argument("--speculate", metavar="ngram|MODEL", help="speculative decoding (exact): draft with prompt lookup "
                   "(ngram) or a draft model sharing the vocabulary (a model name or path); timings report the "
                   "acceptance rate")
    r.add_argument("--draft", metavar="MODEL", help="the same as --speculate MODEL")
    r.add_argument("--draft-k", type=int, default=None,
                   help="most tokens drafted per pass (default 7; prompt lookup drafts fewer as its acceptance falls)")
    r.add_argument("--beams", type=int, default=None, metavar="K", help="beam search with K beams (1..16): prints "
                   "the K best continuations with their cumulative logprobs (runtime_py/beam.py); not with sampling "
                   "flags other than --temperature 0, --stop, output constraints or --speculate")
    r.add_argument("--length-penalty", type=float, default=None, metavar="A", help="with --beams: score = "
                   "cumulative logprob / length ** A (default 1.0; 0 = plain cumulative logprob)")
    r.add_argument("--ctx", type=int, default=None, help="context length (default 2048, at most the model's)")
    _activations_flag(r)
    r.add_argument("--json", action="store_true", help="print one JSON object: model, prompt_ids, ids, text, "
                                                       "finish_reason, top_logprobs, timings (schema: "
                                                       "tests/gpu/test_cli.py)")
    r.add_argument("--verify", action="store_true", help="hash the GGUF and every artifact file again before running")

    t = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (earlier turns stay cached)")
    t.add_argument("model", nargs="?", default=None, help="GGUF path, artifact dir or model name (default smollm2)")
    t.add_argument("--system", help="system message")
    t.add_argument("--chat-template", help="jinja chat template file overriding the model's")
    t.add_argument("--parse-special", action="store_true", help="control-token text in messages becomes control "
                   "tokens, as in llama.cpp (default: plain text)")
    _sampling_flags(t)
    t.add_argument("--ctx", type=int, default=None, help="context length (default 2048, at most the model's)")
    _activations_flag(t)
    t.add_argument("--verify", action="store_true", help="hash the GGUF and every artifact file again first")
    t.set_defaults(json_schema=None, json_object=False, grammar=None, regex=None)   # unconstrained

    i = sub.add_parser("inspect", help="describe a GGUF model and its memory needs")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--ctx", type=int, default=None, help="context length (default 2048, at most the model's, as run)")
    i.add_argument("--quant", choices=REQUANT_TARGETS, default=None, help="show sizes after `compile --quant`")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kv-memory", default=None, metavar="MIB|Ntokens", help="size the `kiln serve` KV pool it plans "
                   "(as kiln serve --kv-memory)")

    s = sub.add_parser("serve", help="serve the web demo and the OpenAI-compatible API")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", action="append", help="model to serve (repeatable; default smollm2)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    s.add_argument("--ctx", type=int, default=None)
    _activations_flag(s)
    s.add_argument("--verify", action="store_true", help="hash each GGUF and artifact file again at startup")
    s.add_argument("--speculate", choices=["ngram"], default=None, help="speculative decoding (exact) with prompt "
                   "lookup for every request; usage.speculative reports the acceptance")
    s.add_argument("--kv-memory", default=None, metavar="MIB|Ntokens", help="the paged KV pool shared by the batched "
                   "requests of each model: MiB (e.g. 512) or tokens (e.g. 16384tokens); default: room for 4 "
                   "full-context sequences, at most 1024 MiB (env KILN_KV_MEMORY); a request waits for free pages")

    e = sub.add_parser("export", help="write the web demo and models as a static site (any web server or CDN)")
    e.add_argument("dir", help="output directory (replaced if it holds an earlier export)")
    e.add_argument("models", nargs="*", help="models to include: names, GGUF paths or artifact dirs (default smollm2)")
    e.add_argument("--models-url", default=None,
                   help="where models/ will be hosted when not next to the page, e.g. https://cdn.example.com/kiln/"
                        "models/ (that host must send CORS headers)")
    b = sub.add_parser("bench", add_help=False, help="dispatches / submits / bytes per token, tok/s at positions 100 "
                                                     "and 1000, roofline, llama.cpp beside it (see runtime_py/bench.py)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p
