"""The OpenAI wire format of `kiln serve` (runtime_py/api.py): request bodies with strict JSON types, error
responses in OpenAI's shape, and the response pieces (usage, logprobs, SSE events).

Request bodies check JSON types only ("0.5" is not a number); sampling fields get their defaults, aliases and ranges
from runtime_py/sampling.py REQUEST_TABLE. Unknown fields are ignored (see api.py's docstring for why).
"""
from __future__ import annotations

import json
import traceback
from typing import Any, Literal, Union

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compiler.errors import ContextOverflowError, InvalidParameterError, KilnError

MAX_BODY_BYTES = 1 << 20         # 1 MiB: larger request bodies get a 413 (Content-Length and the bytes actually read)
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5


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


def to_api_error(exc: Exception) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(list(exc.errors()))
    if isinstance(exc, json.JSONDecodeError):
        return APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json")
    if isinstance(exc, InvalidParameterError):
        return APIError(400, f"Invalid value for '{exc.param}': {exc}.", param=exc.param, code="invalid_value")
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
        err = to_api_error(exc) or APIError(500, "internal server error")
        return err.response()
    for cls in (APIError, RequestValidationError, KilnError, json.JSONDecodeError):
        app.add_exception_handler(cls, handler)


class OpenAIRoute(APIRoute):
    """Every error raised while handling one of our routes (dependencies included) becomes an OpenAI-shaped body,
    whatever exception handlers the app has."""

    def get_route_handler(self):
        inner = super().get_route_handler()

        async def handler(request: Request):
            try:
                return await inner(request)
            except Exception as exc:  # noqa: BLE001
                err = to_api_error(exc)
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


class ToolCallFunction(_Req):
    name: str
    arguments: str                  # a JSON text, as OpenAI sends it


class ToolCall(_Req):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # assistant: the calls it made (rendered back, runtime_py/tools.py)
    tool_call_id: str | None = None              # tool: the call this is the result of


class CommonRequest(_Req):
    model: str
    # sampling: JSON types here; defaults, aliases and ranges in runtime_py/sampling.py REQUEST_TABLE (from_request)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    n: int | None = Field(None, ge=1, le=128)
    # beam search, vLLM's extension (runtime_py/beam.py check_request): n best of best_of beams
    use_beam_search: bool = False
    best_of: int | None = Field(None, ge=1)
    length_penalty: float | None = None
    early_stopping: Union[bool, str, None] = None     # refused when given (kiln's stop is exact: beam.py)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False
    # output constraints (runtime_py/grammar.py): shapes checked by REQUEST_TABLE, contents by the grammar engine
    response_format: dict[str, Any] | None = None
    grammar: str | None = None        # GBNF, llama.cpp's grammar format (as llama.cpp's server takes it)
    regex: str | None = None          # as vLLM's guided_regex


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    parse_special: bool = False   # kiln: control-token text in message contents becomes control tokens (llama.cpp's)


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS_COMPLETION)
    echo: bool = False
    suffix: str | None = None


async def read_json(request: Request, cls):
    """The body of `request` as the pydantic model `cls`: 413 past MAX_BODY_BYTES (declared or read), 400 otherwise."""
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


def _too_large(n: int) -> APIError:
    return APIError(413, f"Request body too large: {n} bytes, the limit is {MAX_BODY_BYTES} bytes.",
                    code="request_too_large")


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"Unsupported value for '{param}': {why}.", param=param, code="unsupported_value")


def check_common(r: CommonRequest):
    if not r.use_beam_search:     # with beams: n best of best_of (runtime_py/beam.py check_request)
        if (r.n or 1) != 1:
            raise unsupported("n", "kiln generates one choice per request (n must be 1) unless use_beam_search is "
                                   "set")
        if (r.best_of or 1) != 1:
            raise unsupported("best_of", "kiln generates one choice per request (best_of must be 1) unless "
                                         "use_beam_search is set")
    if r.stream_options is not None and not r.stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options", code="invalid_value")
    if r.logit_bias:
        raise unsupported("logit_bias", "logit_bias is not implemented")


# ------------------------------------------------------------------------------------------------------------------
# response shapes


def usage(n_prompt: int, n_out: int, cached: int = 0, timings: dict | None = None) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens whose KV was reused instead of prefilled; with speculative
    decoding (kiln serve --speculate) the extension `speculative`: draft_tokens, accepted_tokens, acceptance_rate."""
    out = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if timings and "draft_tokens" in timings:
        out["speculative"] = {k: timings[k] for k in ("draft_tokens", "accepted_tokens", "acceptance_rate")}
    return out


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", "surrogatepass"))


def chat_logprobs(lps: list) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": _bytes(t),
                         "top_logprobs": [{"token": a, "logprob": b, "bytes": _bytes(a)} for a, b in top]}
                        for t, lp, top in lps], "refusal": None}


def completion_logprobs(lps: list, offset0: int) -> dict:
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


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
