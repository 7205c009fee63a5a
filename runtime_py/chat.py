"""Chat messages -> prompt text, with the model's Jinja chat template rendered the way HF transformers renders it.

    prompt = render_chat(manifest["chat_template"], [{"role": "user", "content": "Hi"}],
                         bos_token=info["bos_token"], eos_token=info["eos_token"], arch=manifest["model"]["arch"])
    ids = tokenizer.encode(prompt)           # parse_special=True: the template's control tokens become their ids

Templates come from model files, i.e. from strangers, so they run in Jinja's ImmutableSandboxedEnvironment (no
attribute access to internals, no mutation of the messages) with the same options and helpers as transformers'
`apply_chat_template`: trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, and a `tojson`
that does not HTML-escape. Any failure becomes a ChatTemplateError with a one-line message.

A GGUF without a template gets llama.cpp's built-in template for its architecture (below, as Jinja), else ChatML.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compiler.errors import KilnError


class ChatTemplateError(KilnError):
    """The chat template failed to compile or render (bad syntax, raise_exception, unsafe access, ...)."""


# llama.cpp llm_chat_apply_template, LLM_CHAT_TEMPLATE_CHATML.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# llama.cpp llm_chat_apply_template, LLM_CHAT_TEMPLATE_GEMMA: Gemma has no system role, so the (trimmed) system
# messages are concatenated and put at the top of the next user turn; "assistant" is called "model"; every content is
# trimmed. No BOS here: the tokenizer adds it (add_bos), as llama.cpp does.
GEMMA_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + (message['content'] | trim) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if ns.system and role != 'model' -%}"
    "{{- ns.system + '\\n\\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{{- (message['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# general.architecture -> fallback template when the GGUF has no tokenizer.chat_template.
FALLBACK_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def fallback_template(arch: str | None) -> str:
    return FALLBACK_TEMPLATES.get(arch or "", CHATML_TEMPLATE)


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
                bos_token: str = "", eos_token: str = "", arch: str | None = None, **extra) -> str:
    """The prompt text for `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

    template: the GGUF's tokenizer.chat_template; None -> llama.cpp's built-in template for `arch`, else ChatML.
    bos_token / eos_token: token texts the template may reference. extra: more template variables (e.g. tools).
    """
    if template is None:
        template = fallback_template(arch)
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
