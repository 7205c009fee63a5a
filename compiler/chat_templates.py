"""Chat templates for GGUFs that carry none (no `tokenizer.chat_template`): llama.cpp's built-in template for the
architecture, written as Jinja, so that the manifest always holds the template the runtimes render (runtime_py/chat.py
and web/chat.js keep no copy). The compiler picks one in compiler/tokenizer.py: tokenizer_info.
"""
from __future__ import annotations

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

# general.architecture -> fallback template when the GGUF has no tokenizer.chat_template (else ChatML).
FALLBACK_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def fallback_template(arch: str | None) -> str:
    return FALLBACK_TEMPLATES.get(arch or "", CHATML_TEMPLATE)
