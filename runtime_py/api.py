"""OpenAI-compatible HTTP API on the native runtime: `make_router(artifacts, api_key=, ctx=)` for `kiln serve`.

    POST /v1/chat/completions   chat (messages rendered with the model's chat template), streaming or not
    POST /v1/completions        plain text completion (prompt: string, [string], token ids or [token ids])
    GET  /v1/models             the served models;  GET /v1/models/{id}
    GET  /health                liveness + slot / queue occupancy (never needs the API key)

Responses are shaped like OpenAI's (ids, object, created, model, choices, usage, logprobs); streaming is SSE
(`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`), with a final usage chunk (empty choices) when
`stream_options.include_usage` is set. Errors are always `{"error": {"message", "type", "param", "code"}}`:
400 bad parameters / prompt + max_tokens beyond the context, 401 missing or wrong key (every /v1 route, when
`api_key` is set), 404 unknown model or /v1 route, 405 wrong method, 413 body over MAX_BODY_BYTES, 503 queue full,
500 only for failures of the server itself (a model that does not load, a GPU error).

Request fields. Accepted: model, messages / prompt, max_tokens, max_completion_tokens, temperature, top_p, top_k,
min_p, stop (string or up to 4 strings), seed, presence_penalty, frequency_penalty, repetition_penalty
(alias repeat_penalty), n (1 only), stream, stream_options.include_usage, logprobs + top_logprobs (chat: bool and
0..20; completions: int 0..5), echo and best_of=1 (completions), user. Extension (as in vLLM): return_token_ids=true
adds `prompt_token_ids` to the response and `token_ids` to each choice / chunk. Fields that would change the output
in ways kiln does not implement (tools, tool_choice other than "none", response_format other than text, logit_bias,
suffix, best_of > 1, n > 1, non-text content parts) are refused with a 400 naming the field, rather than silently
ignored. Any other unknown field is ignored (OpenAI-compatible clients and SDK versions send many optional fields;
refusing them would break clients for no benefit). Types are checked strictly ("0.5" is not a number, "yes" is not
a boolean). Sampling defaults are kiln's own (those of `kiln run`: temperature 0.7, top_k 40, top_p 0.95,
min_p 0.05), not OpenAI's temperature 1 without truncation; temperature 0 is greedy and uses the GPU argmax, giving
exactly the tokens of `kiln run --temperature 0`.

Threading. All GPU work (model load, KV-slot allocation, every forward) runs on one worker thread per router
(`Engine`). Each model has up to `slots` Sessions (KV caches, created on demand and reused); an admitted request
gets one for itself and keeps it to the end, so concurrent requests never share state. The worker interleaves the
active requests round-robin, one step each per turn: a step is one prefill chunk of the prompt or one decode token
(`session.forward([tok])`), so every active stream progresses and a long prompt delays the others by at most one
prefill chunk. Requests beyond the slots wait, FIFO, in a bounded queue (`max_queue` per model); a request arriving
when slots + queue are full gets a 503. A client that disconnects (or a stream that is closed) marks its request
cancelled: the worker drops it before its next step and returns its slot. Sequences are not batched into the same
kernels (the compiled programs take one sequence), so aggregate throughput is that of one stream, shared.
Slots and queue come from make_router's arguments, else $KILN_SLOTS / $KILN_QUEUE, else DEFAULT_SLOTS / DEFAULT_QUEUE.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from compiler.errors import ContextOverflowError, KilnError

MAX_BODY_BYTES = 1 << 20         # 1 MiB: larger request bodies get a 413 (Content-Length and the bytes actually read)
DEFAULT_SLOTS = 4                # KV-cache slots (concurrent sequences on the GPU) per model
DEFAULT_QUEUE = 32               # requests per model allowed to wait for a slot; beyond: 503
MAX_STOP = 4                     # stop sequences per request, as OpenAI
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16   # /v1/completions' default, as OpenAI's; chat defaults to the rest of the context
DISCONNECT_POLL_S = 0.5          # how often a request waiting on the worker checks that its client is still there
KEEPALIVE_S = 15                 # a stream waiting (queued, long prefill) sends an SSE comment this often
RETRY_AFTER_S = 1

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error response in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _loc(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages.0.content' (pydantic names union members in locs)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic / FastAPI validation errors -> one 400 naming the most specific offending field."""
    if not errors:
        errors = [{"loc": (), "msg": "invalid request", "type": ""}]
    e = max(errors, key=lambda x: len(_loc(x.get("loc", ())) or ""))   # a union reports every member: the deepest
    param = _loc(e.get("loc", ()))
    if e.get("type") == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({e.get('msg')}). The body must be "
                             f"a JSON object.", code="invalid_json")
    if param is None:
        return APIError(400, f"Invalid request body: {e.get('msg')}. The body must be a JSON object.")
    if e.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{param}': {e.get('msg')}.", param=param, code="invalid_value")


def _to_api_error(exc: Exception) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(list(exc.errors()))
    if isinstance(exc, json.JSONDecodeError):
        return APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, KilnError):
        return APIError(400, str(exc))
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    return None


def install_error_handlers(app):
    """Optional, for the app: OpenAI-shaped bodies also for errors raised outside this router's routes."""
    async def handler(request, exc):
        err = _to_api_error(exc) or APIError(500, "internal server error")
        return err.response()
    for cls in (APIError, RequestValidationError, KilnError, json.JSONDecodeError):
        app.add_exception_handler(cls, handler)


class _OpenAIRoute(APIRoute):
    """Every error raised while handling one of our routes (dependencies included) becomes an OpenAI-shaped body,
    whatever exception handlers the app has."""

    def get_route_handler(self):
        inner = super().get_route_handler()

        async def handler(request: Request):
            try:
                return await inner(request)
            except Exception as exc:  # noqa: BLE001
                err = _to_api_error(exc)
                if err is None:
                    traceback.print_exc()
                    err = APIError(500, f"internal server error: {type(exc).__name__}")
                return err.response()
        return handler


# ------------------------------------------------------------------------------------------------------------------
# request bodies (strict types; unknown fields ignored, see the module doc)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Req):
    include_usage: bool = False


class ContentPart(_Req):
    type: str                       # only "text" is implemented; others are refused with a 400 by the handler
    text: str | None = None


class Message(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class _Common(_Req):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None                       # <= 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    repeat_penalty: float | None = Field(None, gt=0, le=100)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    parse_special: bool = False   # kiln: control-token text in message contents becomes control tokens (llama.cpp's)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS_COMPLETION)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"Unsupported value for '{param}': {why}.", param=param, code="unsupported_value")


def _check_common(r: _Common):
    if (r.n or 1) != 1:
        raise _unsupported("n", "kiln generates one choice per request (n must be 1)")
    if r.stream_options is not None and not r.stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options", code="invalid_value")
    if isinstance(r.stop, list) and len(r.stop) > MAX_STOP:
        raise APIError(400, f"Invalid value for 'stop': at most {MAX_STOP} stop sequences.", param="stop",
                       code="invalid_value")
    if r.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is not implemented")


# ------------------------------------------------------------------------------------------------------------------
# per-model host-side info: tokenizer, template, context (no GPU; loaded in a thread on first use)


@dataclass
class ModelInfo:
    id: str
    dir: Path
    manifest: dict
    tokenizer: Any
    ctx: int
    created: int


def _load_info(model_id: str, art: Path, ctx: int | None) -> ModelInfo:
    from compiler.manifest import MANIFEST_FILE, read_manifest

    from .model import DEFAULT_CTX
    from .tokenizer import Tokenizer
    m = read_manifest(art)
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    n_ctx = min(ctx or DEFAULT_CTX, m["config"]["context_length"])
    return ModelInfo(model_id, art, m, tok, n_ctx, int((art / MANIFEST_FILE).stat().st_mtime))


# ------------------------------------------------------------------------------------------------------------------
# the GPU worker


class Overloaded(Exception):
    pass


@dataclass
class Job:
    """One request as the worker sees it. Events go back to the request's event loop through `queue`."""
    model_id: str
    prompt_ids: list[int]
    params: Any                    # SamplingParams
    max_tokens: int
    logprobs: int                  # top-k alternatives wanted per token; -1: no logprobs at all
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker-side state
    session: Any = None
    gen: Any = None
    prefilled: int = 0
    prefill_to: int = 0
    tap: Any = None
    engine: Any = None

    def post(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:      # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self):
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.engine is not None:
                self.engine.wake()


class _Tap:
    """The Session as generate() sees it: keeps the last logits (for the chosen token's logprob), and skips the
    prompt prefix that the worker already prefilled chunk by chunk (same chunk boundaries as Session.forward, so
    the result is bit-identical to one forward over the whole prompt)."""

    def __init__(self, session, skip: int):
        self.s, self.skip, self.last = session, skip, None

    @property
    def ctx(self):
        return self.s.ctx

    def reset(self, pos: int = 0):
        self.s.reset(pos + self.skip)

    def forward(self, ids):
        if self.skip:
            ids, self.skip = ids[self.skip:], 0
        self.s.forward(ids)

    def logits(self):
        self.last = self.s.logits()
        return self.last

    def next_token(self):
        return self.s.next_token()


class _GPUModel:
    def __init__(self, model):
        self.model = model
        self.free: list = []
        self.n_sessions = 0


class Engine:
    """Owns the GPU: one worker thread runs every model load and forward pass, round-robin over active jobs."""

    def __init__(self, infos: dict, artifacts: dict[str, Path], ctx: int | None, slots: int,
                 max_queue: int):
        self.artifacts, self.ctx, self.slots, self.max_queue = artifacts, ctx, slots, max_queue
        self._info = infos                           # model id -> () -> ModelInfo (cached)
        self._cv = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {m: deque() for m in artifacts}
        self._admitted: dict[str, int] = {m: 0 for m in artifacts}   # waiting + active, per model
        self._active: list[Job] = []                 # worker thread only (len read by stats())
        self._gpu: dict[str, _GPUModel] = {}         # worker thread only
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- any thread -------------------------------------------------------------------------------------------
    def submit(self, job: Job):
        with self._cv:
            if self._admitted[job.model_id] >= self.slots + self.max_queue:
                raise Overloaded()
            self._admitted[job.model_id] += 1
            job.engine = self
            self._waiting[job.model_id].append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kiln-gpu", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wake(self):
        with self._cv:
            self._cv.notify()

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            active = {}
            for j in list(self._active):
                active[j.model_id] = active.get(j.model_id, 0) + 1
            return {m: {"loaded": m in self._gpu, "slots": self.slots,
                        "sessions": self._gpu[m].n_sessions if m in self._gpu else 0, "active": active.get(m, 0),
                        "queued": len(self._waiting[m]), "max_queue": self.max_queue} for m in self.artifacts}

    # -- worker thread ----------------------------------------------------------------------------------------
    def _run(self):
        while True:
            try:
                if self._turn():
                    return
            except Exception as e:  # noqa: BLE001 — a bug here must not leave every client hanging
                traceback.print_exc()
                for job in list(self._active):
                    try:
                        self._fail(job, e)
                    except Exception:  # noqa: BLE001
                        pass

    def _turn(self) -> bool:
        """Admit waiting jobs into free slots, then one step for every active job. True: stop the worker."""
        starts = []
        with self._cv:
            while not self._stop and not self._active and not any(self._waiting.values()):
                self._cv.wait()
            if self._stop:
                return True
            for mid, q in self._waiting.items():
                for j in [j for j in q if j.cancelled.is_set()]:   # gave up while waiting
                    q.remove(j)
                    self._admitted[mid] -= 1
                busy = sum(1 for j in self._active if j.model_id == mid)
                while q and busy < self.slots:
                    starts.append(q.popleft())
                    busy += 1
            self._active.extend(starts)
        for job in starts:
            self._start(job)
        for job in list(self._active):
            self._step(job)
        return False

    def _finish(self, job: Job, item=None):
        if item is not None:
            job.post(item)
        if job.gen is not None:
            try:
                job.gen.close()
            except Exception:  # noqa: BLE001
                pass
            job.gen = None
        if job.session is not None:
            self._gpu[job.model_id].free.append(job.session)
            job.session = None
        with self._cv:
            if job in self._active:
                self._active.remove(job)
                self._admitted[job.model_id] -= 1

    def _fail(self, job: Job, exc: Exception):
        if isinstance(exc, ContextOverflowError):      # the user's prompt (checked before; kept as a safety net)
            err = _to_api_error(exc)
        else:                                          # the server's own failure: model load, GPU, ...
            if not isinstance(exc, KilnError):
                traceback.print_exc()
            err = APIError(500, f"{type(exc).__name__}: {exc}" if isinstance(exc, KilnError)
                           else f"internal server error: {type(exc).__name__}: {exc}")
        self._finish(job, ("error", err))

    def _start(self, job: Job):
        from .generate import generate
        if job.cancelled.is_set():
            return self._finish(job)
        try:
            g = self._gpu.get(job.model_id)
            if g is None:
                from .model import Model
                g = self._gpu[job.model_id] = _GPUModel(Model(self.artifacts[job.model_id]))
            if g.free:
                job.session = g.free.pop()
            else:
                job.session = g.model.session(self.ctx)
                g.n_sessions += 1
            info = self._info[job.model_id]()
            n, chunk = len(job.prompt_ids), job.session.chunk
            job.prefill_to = ((n - 1) // chunk) * chunk      # whole chunks before the last prompt token's chunk
            job.session.reset(0)
            job.tap = _Tap(job.session, job.prefill_to)
            job.gen = generate(job.tap, info.tokenizer, job.prompt_ids, job.params, max_tokens=job.max_tokens,
                               logprobs=max(job.logprobs, 1) if job.logprobs >= 0 else 0,
                               eog_ids=info.tokenizer.eog_ids, should_stop=job.cancelled.is_set)
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)

    def _step(self, job: Job):
        from .generate import Done
        if job not in self._active:
            return
        if job.cancelled.is_set():
            return self._finish(job)
        try:
            if job.prefilled < job.prefill_to:                # one prefill chunk per turn
                s = job.session
                c = job.prompt_ids[job.prefilled:job.prefilled + s.chunk]
                s.forward(c)
                job.prefilled += len(c)
                return
            ev = next(job.gen)
        except StopIteration:
            return self._finish(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(job, e)
        if isinstance(ev, Done):
            return self._finish(job, ("done", ev))
        lp = None
        if job.logprobs >= 0 and ev.id >= 0 and job.tap.last is not None:
            tok = self._info[job.model_id]().tokenizer
            x = job.tap.last.astype(np.float64)
            m = x.max()
            lse = m + np.log(np.exp(x - m).sum())
            top = [(tok.decode([i]), lpv) for i, lpv in (ev.top_logprobs or [])[:job.logprobs]]
            lp = (tok.decode([ev.id]), float(x[ev.id] - lse), top)
        job.post(("token", ev.id, ev.text, lp))


# ------------------------------------------------------------------------------------------------------------------
# response shapes


def _usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", "surrogatepass"))


def _chat_lp(lps: list) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": _bytes(t),
                         "top_logprobs": [{"token": a, "logprob": b, "bytes": _bytes(a)} for a, b in top]}
                        for t, lp, top in lps], "refusal": None}


def _completion_lp(lps: list, offset0: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    off = offset0
    for t, lp, top in lps:
        out["tokens"].append(t)
        out["token_logprobs"].append(lp)
        d = {}
        for a, b in top:
            d.setdefault(a, b)
        out["top_logprobs"].append(d)
        out["text_offset"].append(off)
        off += len(t)
    return out


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# ------------------------------------------------------------------------------------------------------------------
# the router


def make_router(artifacts: dict[str, Path], *, api_key: str | None, ctx: int | None, slots: int | None = None,
                max_queue: int | None = None) -> APIRouter:
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
                infos[model_id] = _load_info(model_id, artifacts[model_id], ctx)
            return infos[model_id]

    engine = Engine({m: (lambda m=m: info_of(m)) for m in artifacts}, artifacts, ctx, slots, max_queue)
    router = APIRouter(route_class=_OpenAIRoute)
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

    async def read_json(request: Request, cls):
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.") from None
            if declared > MAX_BODY_BYTES:
                raise _too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large(size)
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise APIError(400, "The request body is empty; it must be a JSON object.", code="invalid_json")
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None

    def get_info(model: str) -> ModelInfo:
        if model not in artifacts:
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it. Served: "
                                f"{', '.join(artifacts)}.", param="model", code="model_not_found")
        return info_of(model)

    def sampling(r: _Common) -> SamplingParams:
        d = SamplingParams()
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        p = SamplingParams(
            temperature=d.temperature if r.temperature is None else r.temperature,
            top_k=d.top_k if r.top_k is None else r.top_k,
            top_p=d.top_p if r.top_p is None else r.top_p,
            min_p=d.min_p if r.min_p is None else r.min_p,
            repeat_penalty=r.repetition_penalty or r.repeat_penalty or d.repeat_penalty,
            presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0,
            seed=r.seed, stop=stop)
        if p.top_p == 0:            # OpenAI accepts 0: only the most likely token
            p.top_p, p.top_k = 1.0, 1
        p.validate()
        return p

    def budget(info: ModelInfo, ids: list[int], max_tokens: int | None, default: int | None, param: str) -> int:
        if not ids:
            raise APIError(400, "The prompt is empty: there is nothing to continue.", param=param,
                           code="invalid_value")
        vocab = info.tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"Invalid token id {bad} in '{param}' (vocabulary size {vocab}).", param=param,
                           code="invalid_value")
        n = len(ids)
        if max_tokens is None:
            max_tokens = info.ctx - n if default is None else min(default, info.ctx - n)
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {info.ctx} tokens. However, your "
                                    f"{param} resulted in {n} tokens. Please reduce the length of the {param}.",
                               param=param, code="context_length_exceeded")
        elif n + max_tokens > info.ctx:
            raise APIError(400, f"This model's maximum context length is {info.ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the {param}, {max_tokens} in the completion). "
                                f"Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def submit(request_model: str, ids, params, max_tokens, logprobs) -> Job:
        job = Job(request_model, ids, params, max_tokens, logprobs, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except Overloaded:
            raise APIError(503, f"The server is overloaded: {slots} sequences are generating and {max_queue} "
                                f"requests are waiting for model `{request_model}`. Please retry later.",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return job

    async def next_event(request: Request, job: Job, keepalive: float | None = None):
        """The next worker event; None (and the job cancelled) when the client has gone away; ("tick",) after
        `keepalive` seconds without one."""
        t0 = time.monotonic()
        while True:
            try:
                return await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None
                if keepalive is not None and time.monotonic() - t0 >= keepalive:
                    return ("tick",)

    async def collect(request: Request, job: Job):
        """Non-streaming: run to the end; (Done, [logprob entries]) or raise the job's error."""
        lps = []
        try:
            while True:
                ev = await next_event(request, job)
                if ev is None:
                    raise APIError(499, "client disconnected")
                if ev[0] == "token":
                    if ev[3] is not None:
                        lps.append(ev[3])
                elif ev[0] == "done":
                    return ev[1], lps
                else:
                    raise ev[1]
        finally:
            job.cancel()     # no-op when finished; frees the slot when the handler itself was cancelled

    def stream(request: Request, job: Job, make_chunk, first: list[dict], finish_chunk, usage_chunk,
               include_usage: bool):
        async def body():
            try:
                for c in first:
                    yield _sse(c)
                while True:
                    ev = await next_event(request, job, KEEPALIVE_S)
                    if ev is None:
                        return
                    if ev[0] == "tick":
                        yield ": keep-alive\n\n"      # an SSE comment: clients ignore it, proxies see traffic
                    elif ev[0] == "token":
                        _, tid, text, lp = ev
                        if text or lp is not None:
                            yield _sse(make_chunk(text, [tid] if tid >= 0 else [], lp))
                    elif ev[0] == "done":
                        done = ev[1]
                        yield _sse(finish_chunk(done.finish_reason))
                        if include_usage:
                            yield _sse(usage_chunk(len(job.prompt_ids), len(done.ids)))
                        break
                    else:
                        yield _sse(ev[1].body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()     # client gone (generator closed / cancelled) or finished: the slot is freed
        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

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
        _check_common(r)
        if r.tools:
            raise _unsupported("tools", "tool calling is not implemented")
        if r.functions:
            raise _unsupported("functions", "function calling is not implemented")
        if r.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool calling is not implemented")
        if r.response_format and r.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only {\"type\": \"text\"} is implemented")
        if r.top_logprobs is not None and not r.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                                "'top_logprobs' is used.", param="top_logprobs", code="invalid_value")
        info = await run_in_threadpool(get_info, r.model)   # first use: reads manifest + tokenizer
        params = sampling(r)
        messages = []
        for i, msg in enumerate(r.messages):
            content = msg.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise _unsupported(f"messages.{i}.content.{j}", f"content parts of type {part.type!r} are "
                                           f"not implemented (only {{\"type\": \"text\", \"text\": ...}})")
                content = "\n".join(p.text for p in content)
            messages.append({"role": "system" if msg.role == "developer" else msg.role, "content": content or ""})

        def encode():
            from .chat import chat_prompt_ids   # message contents as plain text unless parse_special
            return chat_prompt_ids(info.tokenizer, info.manifest, messages, parse_special=r.parse_special)
        ids = await run_in_threadpool(encode)
        max_tokens = budget(info, ids, r.max_completion_tokens or r.max_tokens, None, "messages")
        want_lp = (r.top_logprobs or 0) if r.logprobs else -1
        job = submit(r.model, ids, params, max_tokens, want_lp)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": r.model,
                "system_fingerprint": None}
        extra = {"prompt_token_ids": ids} if r.return_token_ids else {}

        if not r.stream:
            done, lps = await collect(request, job)
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                      "logprobs": _chat_lp(lps) if want_lp >= 0 else None, "finish_reason": done.finish_reason}
            if r.return_token_ids:
                choice["token_ids"] = done.ids
            return {**head, "choices": [choice], "usage": _usage(len(ids), len(done.ids)), **extra}

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
        return stream(request, job,
                      lambda text, tids, lp: chunk({"content": text}, None,
                                                   _chat_lp([lp]) if lp is not None else None, tids),
                      first, lambda fr: chunk({}, fr),
                      lambda n_p, n_c: {**chead, "choices": [], "usage": _usage(n_p, n_c)}, include_usage)

    @router.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        r: CompletionRequest = await read_json(request, CompletionRequest)
        _check_common(r)
        if r.suffix:
            raise _unsupported("suffix", "insertion (suffix) is not implemented")
        if (r.best_of or 1) != 1:
            raise _unsupported("best_of", "kiln generates one choice per request (best_of must be 1)")
        if r.echo and r.logprobs is not None:
            raise _unsupported("echo", "echo together with logprobs is not implemented")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _unsupported("prompt", "one prompt per request (a batch of several is not implemented)")
            prompt = prompt[0]
        info = await run_in_threadpool(get_info, r.model)   # first use: reads manifest + tokenizer
        params = sampling(r)
        if isinstance(prompt, str):
            ids = await run_in_threadpool(_encode, info.tokenizer, prompt, "prompt")
        else:
            ids = list(prompt)
        max_tokens = budget(info, ids, r.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        want_lp = r.logprobs if r.logprobs is not None else -1
        echo = (prompt if isinstance(prompt, str) else info.tokenizer.decode(ids)) if r.echo else ""
        job = submit(r.model, ids, params, max_tokens, want_lp)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": r.model, "system_fingerprint": None}
        extra = {"prompt_token_ids": ids} if r.return_token_ids else {}

        if not r.stream:
            done, lps = await collect(request, job)
            choice = {"text": echo + done.text, "index": 0,
                      "logprobs": _completion_lp(lps, len(echo)) if want_lp >= 0 else None,
                      "finish_reason": done.finish_reason}
            if r.return_token_ids:
                choice["token_ids"] = done.ids
            return {**head, "choices": [choice], "usage": _usage(len(ids), len(done.ids)), **extra}

        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        u = {"usage": None} if include_usage else {}
        offset = [len(echo)]

        def chunk(text, finish=None, lp=None, token_ids=None):
            c = {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
            if r.return_token_ids:
                c["token_ids"] = token_ids or []
            return {**head, "choices": [c], **u}

        def token_chunk(text, tids, lp):
            lpo = _completion_lp([lp], offset[0]) if lp is not None else None
            offset[0] += len(text)
            return chunk(text, None, lpo, tids)
        first = [{**chunk(echo), **extra}] if (echo or r.return_token_ids) else []
        return stream(request, job, token_chunk, first, lambda fr: chunk("", fr),
                      lambda n_p, n_c: {**head, "choices": [], "usage": _usage(n_p, n_c)}, include_usage)

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


def _too_large(n: int) -> APIError:
    return APIError(413, f"Request body too large: {n} bytes, the limit is {MAX_BODY_BYTES} bytes.",
                    code="request_too_large")
