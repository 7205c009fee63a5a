"""Chat messages -> prompt ids, with the model's Jinja chat template rendered the way HF transformers renders it.

    ids = chat_prompt_ids(tokenizer, manifest, [{"role": "user", "content": "Hi"}])
    prompt = render_chat(manifest["chat_template"], messages, bos_token=info["bos_token"], eos_token=...)   # the text

Only the template's own markup becomes control tokens: a message *content* is tokenized with special tokens off, so
a user who types "<|im_end|>\n<|im_start|>system" gets those characters as plain text, not a forged system turn
(llama.cpp's server, vLLM and transformers' apply_chat_template all parse them). `parse_special=True` (the CLI's
`--parse-special`, the HTTP API's `parse_special` field) keeps the old behaviour: the whole prompt parsed.
How the content is found in the rendered text: `render_chat_spans` renders the messages twice, once as they are and
once with each content replaced by a unique placeholder; the placeholder render gives the template's markup (the
text between placeholders), and the real render is aligned to it (the content as is, trimmed, or, for templates that
rewrite it, whatever lies between two pieces of markup). Normal prompts give exactly the ids of the whole-text encode
(the reference fixtures), because the tokenizer splits at the same special tokens.

Templates come from model files, i.e. from strangers, so they run in Jinja's ImmutableSandboxedEnvironment (no
attribute access to internals, no mutation of the messages) with the same options and helpers as transformers'
`apply_chat_template`: trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, and a `tojson`
that does not HTML-escape. Any failure becomes a ChatTemplateError with a one-line message.

The template is the manifest's: the compiler writes the GGUF's own, or llama.cpp's built-in one for the architecture
when the file has none (compiler/chat_templates.py); runtimes keep no copy.
"""
from __future__ import annotations

import functools
import json
import secrets
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compiler.errors import KilnError


class ChatTemplateError(KilnError):
    """The chat template failed to compile or render (bad syntax, raise_exception, unsafe access, ...)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        # Jinja's default returns an Undefined that renders as "" — a template poking at `__class__` would silently
        # print nothing. Fail loudly instead: such a template is broken or hostile.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant spans with it): render the body as is."""
    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt text for `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

    template: the manifest's chat_template (the GGUF's, or the compiler's fallback for the architecture).
    bos_token / eos_token: token texts the template may reference. extra: more template variables (e.g. tools).
    """
    if not isinstance(template, str):
        raise ChatTemplateError("the artifact has no chat template (it was compiled by an older kiln: recompile it "
                                "with `kiln compile`)")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token,
                                         **{"tools": None, "documents": None, **extra})
    except ChatTemplateError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
    except Exception as e:   # noqa: BLE001 — any render failure is the template's fault, reported in one line
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None


MAX_ALIGN_STEPS = 20_000   # backtracking budget of the generic alignment (templates that rewrite the content)


def render_chat_spans(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                      bos_token: str = "", eos_token: str = "", **extra) -> tuple[str, list[tuple[int, int]]]:
    """(prompt text, [(start, end)] character spans of it that came from message contents), see the module doc."""
    kw = dict(add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **extra)
    text = render_chat(template, messages, **kw)
    nonce = secrets.token_hex(8)
    marks, contents, marked_msgs = {}, [], []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str) and c:   # empty contents add no text (and keep `{% if content %}` branches as they are)
            mark = f"\ue000{nonce}{len(contents)}\ue001"
            marks[mark] = len(contents)
            contents.append(c)
            m = {**m, "content": mark}
        marked_msgs.append(m)
    if not contents:
        return text, []
    marked = render_chat(template, marked_msgs, **kw)
    markup, slots, pos = [], [], 0    # markup[0] content(slots[0]) markup[1] ... markup[-1]
    while True:
        i = marked.find("\ue000" + nonce, pos)
        if i < 0:
            markup.append(marked[pos:])
            break
        j = marked.find("\ue001", i)
        mark = marked[i:j + 1]
        if j < 0 or mark not in marks:
            raise _unalignable()
        markup.append(marked[pos:i])
        slots.append(marks[mark])
        pos = j + 1
    spans = _align(text, markup, [contents[k] for k in slots])
    return text, [s for s in spans if s[1] > s[0]]


def _unalignable() -> ChatTemplateError:
    return ChatTemplateError("chat template error: its output depends on the message text in a way kiln cannot "
                             "separate from its markup, so the content cannot be tokenized apart from the control "
                             "tokens; pass parse_special (`--parse-special`) to tokenize the whole prompt")


def _align(text: str, markup: list[str], contents: list[str]) -> list[tuple[int, int]]:
    """Spans of `text` = markup[0] X0 markup[1] X1 ... markup[-1], where each X_i is contents[i] as the template wrote
    it: as is or stripped (tried first: exact), else any text up to the next occurrence of the following markup
    (templates that rewrite a content). Only markup, taken from the placeholder render, may become control tokens:
    whatever the alignment, the control tokens kept are the markup's, so content typed to look like markup can at
    worst move where one of them lands, never add one."""
    if not text.startswith(markup[0]):
        raise _unalignable()
    spans, pos = [], len(markup[0])          # fast path, no backtracking: every content as is or stripped
    for i, c in enumerate(contents):
        end = next((pos + len(x) for x in (c, c.strip(), c.lstrip(), c.rstrip())
                    if text.startswith(x, pos) and text.startswith(markup[i + 1], pos + len(x))), None)
        if end is None:
            break
        spans.append((pos, end))
        pos = end + len(markup[i + 1])
    if len(spans) == len(contents) and pos == len(text):
        return spans
    if len(contents) > 200:                 # the search below recurses once per content
        raise _unalignable()
    steps = 0

    def solve(i: int, pos: int) -> list[tuple[int, int]] | None:
        nonlocal steps
        steps += 1
        if steps > MAX_ALIGN_STEPS:
            raise _unalignable()
        if i == len(contents):
            return [] if pos == len(text) else None
        after = markup[i + 1]
        c = contents[i]
        tried = set()
        for cand in (c, c.strip(), c.lstrip(), c.rstrip()):
            end = pos + len(cand)
            if end not in tried and text.startswith(cand, pos) and text.startswith(after, end):
                tried.add(end)
                rest = solve(i + 1, end + len(after))
                if rest is not None:
                    return [(pos, end)] + rest
        for end in _ends(text, after, pos, last=i == len(contents) - 1):
            if end not in tried:
                rest = solve(i + 1, end + len(after))
                if rest is not None:
                    return [(pos, end)] + rest
        return None

    spans = solve(0, len(markup[0]))
    if spans is None:
        raise _unalignable()
    return spans


def _ends(text: str, after: str, pos: int, last: bool):
    """Where a content starting at `pos` may end: before an occurrence of the markup that follows it."""
    if last:   # the last markup ends the text
        if text.endswith(after) and len(text) - len(after) >= pos:
            yield len(text) - len(after)
        return
    if not after:
        yield from range(pos, len(text) + 1)
        return
    end = text.find(after, pos)
    while end >= 0:
        yield end
        end = text.find(after, end + 1)


def chat_prompt_ids(tokenizer, manifest: dict, messages: list[dict], *, template: str | None = None,
                    parse_special: bool = False, add_generation_prompt: bool = True, **extra) -> list[int]:
    """Prompt ids for `messages` with the artifact's chat template (or `template`, e.g. `--chat-template FILE`):
    the template's markup parsed for control tokens, the message contents as plain text (unless parse_special)."""
    template = template if template is not None else manifest.get("chat_template")
    for i, m in enumerate(messages):
        try:
            str(m.get("content") or "").encode("utf-8")
        except UnicodeEncodeError:
            raise KilnError(f"message {i}'s content is not valid Unicode (it contains a lone surrogate)") from None
    kw = dict(add_generation_prompt=add_generation_prompt, bos_token=tokenizer.info.get("bos_token") or "",
              eos_token=tokenizer.info.get("eos_token") or "", **extra)
    if parse_special:
        return tokenizer.encode(render_chat(template, messages, **kw))
    text, spans = render_chat_spans(template, messages, **kw)
    return tokenizer.encode(text, plain_spans=spans)
