"""OpenAI-compatible HTTP API on the native runtime: `make_router(artifacts, api_key=, ctx=)` for `kiln serve`.

    POST /v1/chat/completions   chat (messages rendered with the model's chat template), streaming or not
    POST /v1/completions        plain text completion (prompt: string, [string], token ids or [token ids])
    GET  /v1/models             the served models;  GET /v1/models/{id}
    GET  /health                liveness; per model running / waiting requests, the paged KV pool (pages total /
                                used / cached / free / reserved) and the one-sequence slots (never needs the API key)

Responses are shaped like OpenAI's (ids, object, created, model, choices, usage, logprobs); streaming is SSE
(`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`), with a final usage chunk (empty choices) when
`stream_options.include_usage` is set. Errors are always `{"error": {"message", "type", "param", "code"}}`:
400 bad parameters / prompt + max_tokens beyond the context, 401 missing or wrong key (every /v1 route, when
`api_key` is set), 404 unknown model or /v1 route, 405 wrong method, 413 body over MAX_BODY_BYTES, 503 queue full,
400 `kv_pool_too_small` for prompt + max_tokens beyond the whole KV pool (--kv-memory),
500 only for failures of the server itself (a model that does not load, a GPU error).

Request fields. Accepted: model, messages / prompt, max_tokens (alias max_completion_tokens), temperature, top_p,
top_k, min_p, stop (string or up to 4 strings), seed, presence_penalty, frequency_penalty, repetition_penalty
(alias repeat_penalty), repeat_last_n, n (1 only but with beams), stream, stream_options.include_usage, logprobs +
top_logprobs (chat: bool and 0..20; completions: int 0..5), echo (completions), user; output constraints
(runtime_py/grammar.py, llguidance): response_format json_object / json_schema, and the extensions grammar (GBNF, as
llama.cpp's server) and regex (as vLLM's guided_regex), one at a time, a constraint the engine rejects is a 400 with
its message, a state no token can continue ends with finish_reason "grammar"; chat: tools + tool_choice (auto, none,
required, a named function; runtime_py/tools.py: the reply is constrained to a call whose arguments match the
function's schema, returned as message.tool_calls / delta.tool_calls with finish_reason "tool_calls"; role "tool"
messages and assistant tool_calls are rendered back). Extensions (as in vLLM): return_token_ids=true adds
`prompt_token_ids` to the response and `token_ids` to each choice / chunk; use_beam_search=true with n (returned) /
best_of (beams searched, default n, <= 16) and length_penalty (default 1.0): beam search (runtime_py/beam.py), n
choices best first, each with `cumulative_logprob` and `beam_score`; not with stream, tools, output constraints,
stop, sampling settings other than temperature 0 (the search scores the model's own log-probabilities) or a server
started with --speculate (each refused by name). Fields that would change the output in
ways kiln does not implement (functions, parallel_tool_calls=true, logit_bias, suffix, best_of > 1 and n > 1 without
use_beam_search, length_penalty / early_stopping without it, non-text
content parts) are refused with a 400 naming the field, rather than silently ignored. Any other unknown field is ignored (OpenAI-compatible clients and SDK versions send many
optional fields; refusing them would break clients for no benefit). Types are checked strictly ("0.5" is not a
number, "yes" is not a boolean).

Sampling fields map to SamplingParams through one table, runtime_py/sampling.py REQUEST_TABLE (the browser's
web/api.js uses the same table): defaults are kiln's own, those of `kiln run` (temperature 0.7, top_k 40, top_p 0.95,
min_p 0.05, repeat_last_n 64), not OpenAI's temperature 1 without truncation; temperature 0 is greedy and uses the GPU
argmax, giving exactly the tokens of `kiln run --temperature 0`; top_p 0 means only the most likely token; two aliases
given different values are refused. max_tokens defaults, for chat and completions alike, to the rest of the context
(generation ends at EOS or a stop string), as llama.cpp's server, Ollama and OpenAI's chat do.

Threading: runtime_py/scheduler.py `Engine`, one GPU worker thread per router running the admitted requests,
batched into one `rows` forward per step (continuous batching) over a paged KV pool; at most `slots` requests run
at once, the others wait in a bounded queue (also while the pool has too few free pages for them: then they run as
soon as pages come back); a request arriving when slots + queue are full gets a 503; a client that disconnects
frees its pages at once. Slots, queue and the pool's size come from make_router's arguments, else $KILN_SLOTS /
$KILN_QUEUE / $KILN_KV_MEMORY, else DEFAULT_SLOTS / DEFAULT_QUEUE / runtime_py/pages.py's default.

Modules: this file (the routes), runtime_py/api_jobs.py (per-model info, the prompt budget, a request's events:
waited for, collected, streamed), runtime_py/schemas.py (request bodies, errors, response shapes),
runtime_py/scheduler.py + jobs.py + batching.py (the GPU worker), runtime_py/rows.py + pages.py (the paged KV pool).
"""
from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from compiler.errors import KilnError

from .api_jobs import ModelInfo, budget, collect, load_info, stream
from .beam import check_request as beam_request
from .grammar import constraint_for
from .pages import KVPoolTooSmallError, parse_kv_memory
from .scheduler import Engine, Job, Overloaded
from .schemas import (MAX_BODY_BYTES, APIError, ChatRequest, CommonRequest, CompletionRequest, OpenAIRoute,
                      chat_logprobs, check_common, completion_logprobs, install_error_handlers, read_json,
                      unsupported, usage)
from .tools import parse_reply, plan_tools, render_messages, template_takes_tools

__all__ = ["APIError", "MAX_BODY_BYTES", "install_error_handlers", "make_router"]

DEFAULT_SLOTS = 4                # KV-cache slots (concurrent sequences on the GPU) per model
DEFAULT_QUEUE = 32               # requests per model allowed to wait for a slot; beyond: 503
RETRY_AFTER_S = 1


# ------------------------------------------------------------------------------------------------------------------
# the router


def make_router(artifacts: dict[str, Path], *, api_key: str | None, ctx: int | None, slots: int | None = None,
                max_queue: int | None = None, speculate: str | None = None, kv_memory: str | None = None) -> APIRouter:
    from .sampling import SamplingParams

    slots = slots or int(os.environ.get("KILN_SLOTS") or DEFAULT_SLOTS)
    max_queue = max_queue if max_queue is not None else int(os.environ.get("KILN_QUEUE") or DEFAULT_QUEUE)
    if slots < 1 or max_queue < 0:
        raise KilnError("slots must be >= 1 and the queue >= 0")
    if ctx is not None and ctx < 1:
        raise KilnError(f"context length must be at least 1 token (got {ctx})")
    artifacts = {k: Path(v) for k, v in artifacts.items()}
    info_lock = threading.Lock()
    infos: dict[str, ModelInfo] = {}

    def info_of(model_id: str) -> ModelInfo:
        with info_lock:
            if model_id not in infos:
                infos[model_id] = load_info(model_id, artifacts[model_id], ctx)
            return infos[model_id]

    kv_memory = kv_memory or os.environ.get("KILN_KV_MEMORY") or None
    parse_kv_memory(kv_memory)
    if kv_memory is not None and speculate is None:   # a pool of less than one page: refused now, not per request
        from compiler.manifest import read_manifest

        from .rows import pool_plan
        for art in artifacts.values():
            m = read_manifest(art)
            if "kv_page" in m["limits"]:
                pool_plan(m, ctx, kv_memory, slots)
    engine = Engine({m: (lambda m=m: info_of(m)) for m in artifacts}, artifacts, ctx, slots, max_queue, kv_memory)
    engine.speculate = speculate          # "ngram": every request decodes speculatively (runtime_py/speculate.py)
    router = APIRouter(route_class=OpenAIRoute)
    router.engine = engine      # for tests / diagnostics

    # -- helpers ----------------------------------------------------------------------------------------------
    def check_key(request: Request):
        if api_key is None:
            return
        auth = request.headers.get("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def get_info(model: str) -> ModelInfo:
        if model not in artifacts:
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it. Served: "
                                f"{', '.join(artifacts)}.", param="model", code="model_not_found")
        return info_of(model)

    def sampling(r: CommonRequest) -> SamplingParams:
        return SamplingParams.from_request(r.model_dump())   # InvalidParameterError -> 400 naming the field

    def beams(r: CommonRequest):
        """The request's beam search (runtime_py/beam.py BeamSpec) or None; what kiln does not combine with it is
        refused by name."""
        spec = beam_request(r.model_dump())
        if spec is None:
            return None
        if r.stream:
            raise unsupported("stream", "streaming is not implemented with beam search (as in vLLM): which beams "
                                        "win is known only at the end")
        if getattr(r, "tools", None):
            raise unsupported("tools", "tool calls are not implemented with beam search")
        if r.max_tokens is None and r.max_completion_tokens is None and spec.length_penalty > 0:
            # the search cannot end before max_tokens then, and the default (the rest of the context) would run
            # thousands of steps of every beam: a request that looks hung
            raise APIError(400, "max_tokens is required with beam search and length_penalty > 0 (the search runs "
                                "to max_tokens).", param="max_tokens", code="missing_required_parameter")
        if engine.speculate:
            raise unsupported("use_beam_search", "this server decodes speculatively (kiln serve --speculate) and "
                                                 "does not combine it with beam search")
        return spec

    def beam_choices(info: ModelInfo, done, want_lp: int, choice_of) -> tuple[list[dict], int]:
        """(choices, completion tokens) of a beam search: one choice per hypothesis, best first, with its
        cumulative_logprob and beam_score (extensions); choice_of(text, lps) -> the route's choice fields."""
        tok, out = info.tokenizer, []
        for i, (h, text) in enumerate(zip(done.beams, done.texts)):
            lps = [(tok.decode([t]), lp, [(tok.decode([a]), b) for a, b in tops]) for t, lp, tops in h.logprobs] \
                if want_lp >= 0 else None
            c = {"index": i, **choice_of(text, lps), "finish_reason": h.finish_reason,
                 "cumulative_logprob": h.cum_logprob, "beam_score": h.score}
            out.append(c)
        return out, sum(len(h.ids) for h in done.beams)

    def submit(request_model: str, ids, params, max_tokens, logprobs, beams=None) -> Job:
        job = Job(request_model, ids, params, max_tokens, logprobs, asyncio.get_running_loop(), beams=beams)
        try:
            engine.submit(job)
        except KVPoolTooSmallError as e:
            raise APIError(400, str(e), param="max_tokens", code="kv_pool_too_small") from None
        except Overloaded:
            raise APIError(503, f"The server is overloaded: {slots} sequences are generating and {max_queue} "
                                f"requests are waiting for model `{request_model}`. Please retry later.",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return job

    # -- routes -----------------------------------------------------------------------------------------------
    @router.get("/health")
    async def health():
        return {"status": "ok", "models": engine.stats()}

    @router.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        data = []
        for m in artifacts:
            info = await run_in_threadpool(info_of, m)
            data.append({"id": m, "object": "model", "created": info.created, "owned_by": "kiln"})
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        info = await run_in_threadpool(get_info, model_id)
        return {"id": model_id, "object": "model", "created": info.created, "owned_by": "kiln"}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        r: ChatRequest = await read_json(request, ChatRequest)
        check_common(r)
        if r.functions:
            raise unsupported("functions", "the legacy functions field is not implemented (use tools)")
        if r.parallel_tool_calls:
            raise unsupported("parallel_tool_calls", "kiln makes at most one tool call per reply (set it false)")
        if r.top_logprobs is not None and not r.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                                "'top_logprobs' is used.", param="top_logprobs", code="invalid_value")
        params = sampling(r)
        spec = beams(r)                                    # None: one sampled / greedy reply
        plan = plan_tools(r.tools, r.tool_choice)          # None: plain text reply
        if plan is not None:
            if params.constrained:
                raise unsupported("response_format", "a reply with tools is constrained to the tool-call format "
                                                     "already; give tools or an output constraint, not both")
            params.response_format = plan.response_format
        info = await run_in_threadpool(get_info, r.model)   # first use: reads manifest + tokenizer
        await run_in_threadpool(constraint_for, params, info.tokenizer)   # engine-rejected: 400 (then cached)
        messages = []
        for i, msg in enumerate(r.messages):
            content = msg.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise unsupported(f"messages.{i}.content.{j}", f"content parts of type {part.type!r} are "
                                           f"not implemented (only {{\"type\": \"text\", \"text\": ...}})")
                content = "\n".join(p.text for p in content)
            messages.append({"role": "system" if msg.role == "developer" else msg.role, "content": content or "",
                             "name": msg.name, "tool_call_id": msg.tool_call_id,
                             "tool_calls": [c.model_dump() for c in msg.tool_calls] if msg.tool_calls else None})
        messages = render_messages(messages, plan)        # tool calls / results in the generic format
        extra_vars = {"tools": plan.tools} if plan and template_takes_tools(info.manifest.get("chat_template")) else {}

        def encode():
            from .chat import chat_prompt_ids   # message contents as plain text unless parse_special
            return chat_prompt_ids(info.tokenizer, info.manifest, messages, parse_special=r.parse_special,
                                   **extra_vars)
        ids = await run_in_threadpool(encode)
        max_tokens = budget(info, ids, params.max_tokens, "messages")
        want_lp = (r.top_logprobs or 0) if r.logprobs else -1
        job = submit(r.model, ids, params, max_tokens, want_lp, spec)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": r.model,
                "system_fingerprint": None}
        extra = {"prompt_token_ids": ids} if r.return_token_ids else {}

        if spec is not None:
            done, _ = await collect(request, job)
            choices, n_out = beam_choices(info, done, want_lp, lambda text, lps: {
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(lps) if lps is not None else None})
            if r.return_token_ids:
                for c, h in zip(choices, done.beams):
                    c["token_ids"] = h.ids
            return {**head, "choices": choices, "usage": usage(len(ids), n_out, job.cached, done.timings), **extra}

        def reply(done):
            """(message fields, finish_reason) of a finished generation: tool calls parsed out when tools are in play."""
            if plan is None:
                return {"content": done.text}, done.finish_reason
            content, calls = parse_reply(done.text, plan)
            if calls:
                return {"content": None, "tool_calls": calls}, "tool_calls"
            return {"content": content}, done.finish_reason

        if not r.stream:
            done, lps = await collect(request, job)
            fields, finish = reply(done)
            choice = {"index": 0, "message": {"role": "assistant", **fields, "refusal": None},
                      "logprobs": chat_logprobs(lps) if want_lp >= 0 else None, "finish_reason": finish}
            if r.return_token_ids:
                choice["token_ids"] = done.ids
            return {**head, "choices": [choice], "usage": usage(len(ids), len(done.ids), job.cached, done.timings), **extra}

        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        chead = {**head, "object": "chat.completion.chunk"}
        u = {"usage": None} if include_usage else {}

        def chunk(delta, finish=None, lp=None, token_ids=None):
            c = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            if r.return_token_ids:
                c["token_ids"] = token_ids or []
            return {**chead, "choices": [c], **u}
        first = [chunk({"role": "assistant", "content": ""})]
        if r.return_token_ids:
            first[0].update(extra)

        def finish_chunks(done):
            if plan is None:
                return [chunk({}, done.finish_reason)]
            # tools: the reply is JSON in the call format, parsed once complete, then sent as one delta
            fields, finish = reply(done)
            if "tool_calls" in fields:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(fields["tool_calls"])]}
            else:
                delta = {"content": fields["content"]}
            return [chunk(delta, None, None, done.ids), chunk({}, finish)]
        return stream(request, job,
                      lambda text, tids, lp: None if plan is not None else
                      chunk({"content": text}, None, chat_logprobs([lp]) if lp is not None else None, tids),
                      first, finish_chunks,
                      lambda n_p, n_c, n_k, t: {**chead, "choices": [], "usage": usage(n_p, n_c, n_k, t)},
                      include_usage)

    @router.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        r: CompletionRequest = await read_json(request, CompletionRequest)
        check_common(r)
        if r.suffix:
            raise unsupported("suffix", "insertion (suffix) is not implemented")
        if r.echo and r.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs is not implemented")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise unsupported("prompt", "one prompt per request (a batch of several is not implemented)")
            prompt = prompt[0]
        params = sampling(r)
        spec = beams(r)
        info = await run_in_threadpool(get_info, r.model)   # first use: reads manifest + tokenizer
        await run_in_threadpool(constraint_for, params, info.tokenizer)   # engine-rejected: 400 (then cached)
        if isinstance(prompt, str):
            ids = await run_in_threadpool(_encode, info.tokenizer, prompt, "prompt")
        else:
            ids = list(prompt)
        max_tokens = budget(info, ids, params.max_tokens, "prompt")
        want_lp = r.logprobs if r.logprobs is not None else -1
        echo = (prompt if isinstance(prompt, str) else info.tokenizer.decode(ids)) if r.echo else ""
        job = submit(r.model, ids, params, max_tokens, want_lp, spec)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": r.model, "system_fingerprint": None}
        extra = {"prompt_token_ids": ids} if r.return_token_ids else {}

        if spec is not None:
            done, _ = await collect(request, job)
            choices, n_out = beam_choices(info, done, want_lp, lambda text, lps: {
                "text": echo + text, "logprobs": completion_logprobs(lps, len(echo)) if lps is not None else None})
            if r.return_token_ids:
                for c, h in zip(choices, done.beams):
                    c["token_ids"] = h.ids
            return {**head, "choices": choices, "usage": usage(len(ids), n_out, job.cached, done.timings), **extra}

        if not r.stream:
            done, lps = await collect(request, job)
            choice = {"text": echo + done.text, "index": 0,
                      "logprobs": completion_logprobs(lps, len(echo)) if want_lp >= 0 else None,
                      "finish_reason": done.finish_reason}
            if r.return_token_ids:
                choice["token_ids"] = done.ids
            return {**head, "choices": [choice], "usage": usage(len(ids), len(done.ids), job.cached, done.timings), **extra}

        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        u = {"usage": None} if include_usage else {}
        offset = [len(echo)]

        def chunk(text, finish=None, lp=None, token_ids=None):
            c = {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
            if r.return_token_ids:
                c["token_ids"] = token_ids or []
            return {**head, "choices": [c], **u}

        def token_chunk(text, tids, lp):
            lpo = completion_logprobs([lp], offset[0]) if lp is not None else None
            offset[0] += len(text)
            return chunk(text, None, lpo, tids)
        first = [{**chunk(echo), **extra}] if (echo or r.return_token_ids) else []
        return stream(request, job, token_chunk, first, lambda done: [chunk("", done.finish_reason)],
                      lambda n_p, n_c, n_k, t: {**head, "choices": [], "usage": usage(n_p, n_c, n_k, t)},
                      include_usage)

    known = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET"}

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"],
                      include_in_schema=False)
    async def unknown(rest: str, request: Request):
        check_key(request)
        path = "/v1/" + rest
        if path in known:
            raise APIError(405, f"Invalid method for URL ({request.method} {path}): use {known[path]}.",
                           code="method_not_allowed", headers={"Allow": known[path]})
        raise APIError(404, f"Invalid URL ({request.method} {path}).", code="unknown_url")

    return router


def _encode(tok, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"Invalid value for '{param}': the text is not valid Unicode (it contains a lone "
                            f"surrogate).", param=param, code="invalid_value") from None
    return tok.encode(text)

