// Chat messages -> prompt ids with the model's Jinja chat template, via @huggingface/jinja (which renders with
// trim_blocks / lstrip_blocks and provides raise_exception and strftime_now, as transformers does).
// Mirrors runtime_py/chat.py step for step (see its docstring for the why): the template is the manifest's (the
// compiler writes the GGUF's own or llama.cpp's built-in one, compiler/chat_templates.py); message contents are
// tokenized with special tokens off, so typed "<|im_end|>" stays text, unless parseSpecial.
//
//   const ids = chatPromptIds(jinja, tokenizer, manifest, messages, {parseSpecial: false});
//   const prompt = renderChat(jinja, manifest.chat_template, messages, {bos_token, eos_token});   // the text
//
// `jinja` is the imported "@huggingface/jinja" module (see tokenizer.js for why it is passed in).
// The template is data from the model file: @huggingface/jinja interprets it without eval, so it can't reach the page.

import {ChatTemplateError} from "./errors.js";

export {ChatTemplateError};   // one class for the page and the worker (errors.js)

const compiled = new Map();
const MAX_ALIGN_STEPS = 20000;   // backtracking budget of the generic alignment (templates that rewrite the content)

/** The prompt text for `messages` ([{role, content}]) with the manifest's template. */
export function renderChat(jinja, template, messages, {addGenerationPrompt = true, bos_token = "", eos_token = "",
                                                         ...extra} = {}) {
  if (typeof template !== "string") {
    throw new ChatTemplateError("the artifact has no chat template (it was compiled by an older kiln: recompile it " +
                                "with `kiln compile`)");
  }
  try {
    if (!compiled.has(template)) compiled.set(template, new jinja.Template(template));
    return compiled.get(template).render({messages, add_generation_prompt: addGenerationPrompt, bos_token, eos_token,
                                          tools: null, documents: null, ...extra});
  } catch (e) {
    throw new ChatTemplateError(`chat template error: ${e.message}`);
  }
}

function unalignable() {
  return new ChatTemplateError("chat template error: its output depends on the message text in a way kiln cannot " +
                               "separate from its markup, so the content cannot be tokenized apart from the control " +
                               "tokens; pass parse_special (`--parse-special`) to tokenize the whole prompt");
}

/** [prompt text, [[start, end]] spans of it that came from message contents]; runtime_py.chat.render_chat_spans. */
export function renderChatSpans(jinja, template, messages, opts = {}) {
  const text = renderChat(jinja, template, messages, opts);
  const nonce = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
  const marks = new Map(), contents = [];
  const markedMsgs = messages.map((m) => {
    const c = m && typeof m === "object" ? m.content : null;
    if (typeof c !== "string" || !c) return m;   // empty contents add no text
    const mark = `\ue000${nonce}${contents.length}\ue001`;
    marks.set(mark, contents.length);
    contents.push(c);
    return {...m, content: mark};
  });
  if (!contents.length) return [text, []];
  const marked = renderChat(jinja, template, markedMsgs, opts);
  const markup = [], slots = [];
  let pos = 0;
  for (;;) {
    const i = marked.indexOf("\ue000" + nonce, pos);
    if (i < 0) { markup.push(marked.slice(pos)); break; }
    const j = marked.indexOf("\ue001", i);
    const mark = marked.slice(i, j + 1);
    if (j < 0 || !marks.has(mark)) throw unalignable();
    markup.push(marked.slice(pos, i));
    slots.push(marks.get(mark));
    pos = j + 1;
  }
  const spans = align(text, markup, slots.map((k) => contents[k]));
  return [text, spans.filter(([s, e]) => e > s)];
}

const variants = (c) => [c, c.trim(), c.trimStart(), c.trimEnd()];

function* ends(text, after, pos, last) {
  if (last) {
    if (text.endsWith(after) && text.length - after.length >= pos) yield text.length - after.length;
    return;
  }
  if (!after) { for (let e = pos; e <= text.length; e++) yield e; return; }
  for (let e = text.indexOf(after, pos); e >= 0; e = text.indexOf(after, e + 1)) yield e;
}

/** runtime_py.chat._align: the content spans of `text` = markup[0] X0 markup[1] X1 ... markup[n]. */
function align(text, markup, contents) {
  if (!text.startsWith(markup[0])) throw unalignable();
  const spans = [];
  let pos = markup[0].length;
  for (let i = 0; i < contents.length; i++) {   // fast path: every content as is or stripped
    const x = variants(contents[i]).find((v) => text.startsWith(v, pos) && text.startsWith(markup[i + 1], pos + v.length));
    if (x === undefined) break;
    spans.push([pos, pos + x.length]);
    pos += x.length + markup[i + 1].length;
  }
  if (spans.length === contents.length && pos === text.length) return spans;
  if (contents.length > 200) throw unalignable();
  let steps = 0;
  const solve = (i, p) => {
    if (++steps > MAX_ALIGN_STEPS) throw unalignable();
    if (i === contents.length) return p === text.length ? [] : null;
    const after = markup[i + 1], tried = new Set();
    for (const v of variants(contents[i])) {
      const end = p + v.length;
      if (!tried.has(end) && text.startsWith(v, p) && text.startsWith(after, end)) {
        tried.add(end);
        const rest = solve(i + 1, end + after.length);
        if (rest) return [[p, end], ...rest];
      }
    }
    for (const end of ends(text, after, p, i === contents.length - 1)) {
      if (tried.has(end)) continue;
      const rest = solve(i + 1, end + after.length);
      if (rest) return [[p, end], ...rest];
    }
    return null;
  };
  const out = solve(0, markup[0].length);
  if (!out) throw unalignable();
  return out;
}

/** Prompt ids for `messages`; runtime_py.chat.chat_prompt_ids. */
export function chatPromptIds(jinja, tokenizer, manifest, messages, {template = null, parseSpecial = false,
                                                                       addGenerationPrompt = true, ...extra} = {}) {
  template ??= manifest.chat_template ?? null;
  messages.forEach((m, i) => {
    const c = m && typeof m.content === "string" ? m.content : "";
    if (c.isWellFormed && !c.isWellFormed()) {
      throw new ChatTemplateError(`message ${i}'s content is not valid Unicode (it contains a lone surrogate)`);
    }
  });
  const opts = {addGenerationPrompt, bos_token: tokenizer.info.bos_token || "",
                eos_token: tokenizer.info.eos_token || "", ...extra};
  if (parseSpecial) return tokenizer.encode(renderChat(jinja, template, messages, opts));
  const [text, spans] = renderChatSpans(jinja, template, messages, opts);
  return tokenizer.encode(text, null, {plainSpans: spans});
}
