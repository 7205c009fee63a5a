// Chat messages -> prompt text with the model's Jinja chat template, via @huggingface/jinja (which renders with
// trim_blocks / lstrip_blocks and provides raise_exception and strftime_now, as transformers does).
// Mirrors runtime_py/chat.py, including its fallback templates (keep the two copies identical).
//
//   const prompt = renderChat(jinja, manifest.chat_template, messages, {bos_token, eos_token, arch});
//
// `jinja` is the imported "@huggingface/jinja" module (see tokenizer.js for why it is passed in).
// The template is data from the model file: @huggingface/jinja interprets it without eval, so it can't reach the page.

export class ChatTemplateError extends Error {
  get name() { return "ChatTemplateError"; }
}

// llama.cpp llm_chat_apply_template, LLM_CHAT_TEMPLATE_CHATML.
export const CHATML_TEMPLATE =
  "{%- for message in messages -%}" +
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}" +
  "{%- endfor -%}" +
  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

// llama.cpp llm_chat_apply_template, LLM_CHAT_TEMPLATE_GEMMA (see runtime_py/chat.py for the why of each part).
export const GEMMA_TEMPLATE =
  "{%- set ns = namespace(system='') -%}" +
  "{%- for message in messages -%}" +
  "{%- if message['role'] == 'system' -%}" +
  "{%- set ns.system = ns.system + (message['content'] | trim) -%}" +
  "{%- else -%}" +
  "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}" +
  "{{- '<start_of_turn>' + role + '\\n' -}}" +
  "{%- if ns.system and role != 'model' -%}" +
  "{{- ns.system + '\\n\\n' -}}" +
  "{%- set ns.system = '' -%}" +
  "{%- endif -%}" +
  "{{- (message['content'] | trim) + '<end_of_turn>\\n' -}}" +
  "{%- endif -%}" +
  "{%- endfor -%}" +
  "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}";

const FALLBACK_TEMPLATES = {gemma: GEMMA_TEMPLATE, gemma2: GEMMA_TEMPLATE, gemma3: GEMMA_TEMPLATE};

export function fallbackTemplate(arch) { return FALLBACK_TEMPLATES[arch || ""] || CHATML_TEMPLATE; }

const compiled = new Map();

/** The prompt text for `messages` ([{role, content}]); template null -> llama.cpp's built-in one for `arch`. */
export function renderChat(jinja, template, messages, {addGenerationPrompt = true, bos_token = "", eos_token = "",
                                                         arch = null, ...extra} = {}) {
  template ??= fallbackTemplate(arch);
  try {
    if (!compiled.has(template)) compiled.set(template, new jinja.Template(template));
    return compiled.get(template).render({messages, add_generation_prompt: addGenerationPrompt, bos_token, eos_token,
                                          tools: null, documents: null, ...extra});
  } catch (e) {
    throw new ChatTemplateError(`chat template error: ${e.message}`);
  }
}
