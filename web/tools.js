// OpenAI tool calls (`tools`, `tool_choice`) on any chat model, in the browser. Mirrors runtime_py/tools.py (see its
// docstring for the format: llama.cpp's generic JSON one, the reply constrained by one JSON Schema built from the
// functions' `parameters`, earlier calls and results rendered back as JSON turns).
//
//   const plan = planTools(tools, toolChoice);           // null: no tools in play (absent, or tool_choice "none")
//   const messages = renderMessages(req.messages, plan); // what the chat template sees
//   params.response_format = plan.response_format;       // the reply's grammar (web/grammar.js)
//   const [content, calls] = parseReply(text, plan);     // calls: [{id, type: "function", function: {name, arguments}}]

import {InvalidParameterError} from "./errors.js";

export const TOOLS_PROMPT = "You can call these tools (JSON Schema of each one's arguments):\n{tools}\n\n" +
  "Reply with one JSON object and nothing else: {format}";
export const FORMAT_CALL = "{\"tool_call\": {\"name\": <tool name>, \"arguments\": <its arguments>}} to call a tool";
export const FORMAT_ANSWER = "{\"response\": <your answer as a string>} to answer directly";

const fail = (msg, param = "tools") => { throw new InvalidParameterError(msg, param); };
const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);

/** Python's json.dumps(obj, ensure_ascii=False): ", " and ": " separators, so both sides render the same prompt. */
export function pyJson(v) {
  if (Array.isArray(v)) return `[${v.map(pyJson).join(", ")}]`;
  if (isObject(v)) return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyJson(x)}`).join(", ")}}`;
  if (typeof v === "number" && Number.isInteger(v) && !Object.is(v, -0)) return String(v);
  return JSON.stringify(v);
}

/** The request's tools + tool_choice, validated; null when the reply is plain text. As tools.py plan_tools. */
export function planTools(tools, toolChoice) {
  if (toolChoice != null && !(Array.isArray(tools) && tools.length) && toolChoice !== "none") {
    fail("tool_choice needs tools", "tool_choice");
  }
  if (tools == null || (Array.isArray(tools) && !tools.length) || toolChoice === "none") return null;
  if (!Array.isArray(tools)) fail("tools must be a list");
  const funcs = tools.map((t, i) => {
    const f = isObject(t) ? t.function : null;
    if (!isObject(t) || t.type !== "function" || !isObject(f)) {
      fail(`tools.${i} must be {"type": "function", "function": {...}} (only function tools exist)`, `tools.${i}`);
    }
    if (typeof f.name !== "string" || !f.name) {
      fail(`tools.${i}.function.name must be a non-empty string`, `tools.${i}.function.name`);
    }
    const parameters = f.parameters ?? {type: "object", properties: {}};
    if (!isObject(parameters)) {
      fail(`tools.${i}.function.parameters must be a JSON Schema object`, `tools.${i}.function.parameters`);
    }
    return {name: f.name, description: f.description || "", parameters};
  });
  const names = funcs.map((f) => f.name);
  if (new Set(names).size !== names.length) fail("tool names must be unique");
  let choice;
  if (toolChoice == null || toolChoice === "auto") choice = "auto";
  else if (toolChoice === "required") choice = "required";
  else if (isObject(toolChoice) && toolChoice.type === "function" && isObject(toolChoice.function)
           && names.includes(toolChoice.function.name)) choice = toolChoice.function.name;
  else {
    fail("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": " +
         "<one of the tools>}}", "tool_choice");
  }
  const calls = funcs.filter((f) => choice === "auto" || choice === "required" || f.name === choice).map((f) => ({
    type: "object", properties: {name: {const: f.name}, arguments: f.parameters},
    required: ["name", "arguments"], additionalProperties: false}));
  const call = {type: "object", properties: {tool_call: calls.length === 1 ? calls[0] : {anyOf: calls}},
                required: ["tool_call"], additionalProperties: false};
  const schema = choice !== "auto" ? call : {anyOf: [call, {
    type: "object", properties: {response: {type: "string"}}, required: ["response"], additionalProperties: false}]};
  return {tools, functions: funcs, choice,
          response_format: {type: "json_schema", json_schema: {name: "tool_reply", schema}}};
}

/** Does the chat template render `tools` itself? As tools.py template_takes_tools. */
export function templateTakesTools(template) {
  return typeof template === "string" && template.includes("tools");
}

export function systemPrompt(plan) {
  const described = plan.functions.filter((f) => plan.choice === "auto" || plan.choice === "required" ||
                                          f.name === plan.choice).map(pyJson).join("\n");
  const fmt = plan.choice !== "auto" ? FORMAT_CALL : `${FORMAT_CALL}, or ${FORMAT_ANSWER}`;
  return TOOLS_PROMPT.replace("{tools}", described).replace("{format}", fmt);
}

/** Messages (role, content, tool_calls, tool_call_id, name) -> plain {role, content} turns; as render_messages. */
export function renderMessages(messages, plan) {
  const names = new Map();      // tool_call_id -> function name, for results that do not repeat it
  const out = [];
  for (const m of messages) {
    let role = m.role, content = m.content || "";
    if (role === "assistant" && Array.isArray(m.tool_calls) && m.tool_calls.length) {
      const calls = m.tool_calls.map((c) => {
        const fn = c.function || {};
        names.set(c.id ?? null, fn.name ?? null);
        let args;
        try {
          args = JSON.parse(fn.arguments || "{}");
        } catch {
          fail("an assistant message's tool_calls[].function.arguments must be a JSON string", "messages");
        }
        return {name: fn.name ?? null, arguments: args};
      });
      content = calls.map((c) => pyJson({tool_call: c})).join("\n");
    } else if (role === "tool") {
      role = "user";
      content = pyJson({tool_response: {name: m.name || names.get(m.tool_call_id ?? null) || null, content}});
    }
    if (out.length && role === "user" && out[out.length - 1].role === "user" && m.role === "tool") {
      out[out.length - 1] = {role: "user", content: `${out[out.length - 1].content}\n${content}`};
    } else {
      out.push({role, content});
    }
  }
  if (plan !== null) {
    const sp = systemPrompt(plan);
    if (out.length && out[0].role === "system") out[0] = {role: "system", content: `${out[0].content}\n\n${sp}`};
    else out.unshift({role: "system", content: sp});
  }
  return out;
}

const hex24 = () => Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0"))
  .join("");

/** [content, tool_calls] of a generated reply; a reply cut short is returned as content, as is. As parse_reply. */
export function parseReply(text, plan) {
  let obj;
  try {
    obj = JSON.parse(text);
  } catch {
    return [text, []];
  }
  if (isObject(obj) && isObject(obj.tool_call)) {
    const c = obj.tool_call;
    return [null, [{id: `call_${hex24()}`, type: "function",
                    function: {name: c.name ?? null, arguments: pyJson(c.arguments ?? {})}}]];
  }
  if (isObject(obj) && typeof obj.response === "string") return [obj.response, []];
  return [text, []];
}
