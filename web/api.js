// The page-side API, shaped like OpenAI's chat completions (as WebLLM's is). The engine itself runs in worker.js.
//
//   import {createEngine} from "/web/api.js";
//   const engine = await createEngine("/models/smollm2/", {onProgress: (p) => ..., onDeviceLost: (msg) => ...});
//   engine.selftest      // {ok, max_diff, tolerance, ...}: check it before trusting the output (see engine.js)
//   for await (const chunk of await engine.chat.completions.create({messages, stream: true, temperature: 0.7,
//       top_p, top_k, min_p, repetition_penalty (alias repeat_penalty), repeat_last_n, presence_penalty,
//       frequency_penalty, seed, stop, max_tokens (alias max_completion_tokens)})) {
//     out += chunk.choices[0]?.delta?.content ?? "";
//   }
//   engine.interrupt();  // ends the running generation after its current token (finish_reason "stop")
//   engine.resetChat();  // forget the conversation the engine's KV cache holds (as WebLLM's resetChat)
//
// Also engine.completions.create({prompt, ...}) (raw text, no chat template; `prompt` may be token ids).
// Streams end with a chunk carrying `usage` (always sent) and `kiln: {prompt_ids, ids, timings}` with
// timings {cached_tokens, ttft_s, prefill_tok_s, decode_tok_s, total_s}; non-streaming responses carry both too.
// The engine keeps the conversation's KV cache between requests: send the whole conversation each turn, as with
// OpenAI, and only what the cache lacks is prefilled (usage.prompt_tokens_details.cached_tokens says how much not).
// Sampling fields go through SamplingParams.fromRequest (web/sampler.js), the same table as the native server's
// (runtime_py/sampling.py REQUEST_TABLE): same defaults, aliases and checks; max_tokens defaults to the rest of the
// context. A bad value rejects with InvalidParameterError (`param` names the field) before anything runs.
// Leaving a `for await` early interrupts that request. Errors are the classes of errors.js (re-exported here), also
// when they were thrown in the worker.

import {DeviceLostError, ERRORS, InvalidParameterError, KilnError, errorFromJson} from "./errors.js";
import {moduleProblem} from "./loader.js";
import {SamplingParams} from "./sampler.js";
import {parseReply, planTools, renderMessages} from "./tools.js";

/** Fields the browser runtime does not implement are refused by name, never ignored. */
function refuseUnimplemented(req, kind) {
  if (kind === "text" && req.suffix != null && req.suffix !== "") {
    throw new InvalidParameterError("suffix: insertion (suffix) is not implemented", "suffix");
  }
  if (kind === "text" && req.echo === true) {   // the native server implements it (runtime_py/api.py)
    throw new InvalidParameterError("echo is not implemented in the browser runtime", "echo");
  }
  if (Array.isArray(req.functions) ? req.functions.length : req.functions != null) {
    throw new InvalidParameterError("the legacy functions field is not implemented (use tools)", "functions");
  }
  if (req.parallel_tool_calls === true) {
    throw new InvalidParameterError("kiln makes at most one tool call per reply (set it false)", "parallel_tool_calls");
  }
  // beam search runs natively only (runtime_py/beam.py: kiln run --beams, kiln serve use_beam_search)
  for (const name of ["use_beam_search", "length_penalty", "early_stopping"]) {
    if (name === "use_beam_search" ? req[name] === true : req[name] != null) {
      throw new InvalidParameterError(`${name}: beam search is not implemented in the browser runtime (it runs ` +
                                      "natively: `kiln run --beams K`, `kiln serve` with use_beam_search)", name);
    }
  }
  for (const name of ["n", "best_of"]) {
    if (req[name] != null && req[name] !== 1) {
      throw new InvalidParameterError(`the browser runtime generates one choice per request (${name} must be 1)`,
                                      name);
    }
  }
}

export * from "./device.js";

function libUrls() {
  // Import maps don't apply inside workers: resolve the bare names here, with the page's import map.
  const resolve = (name, fallback) => {
    try {
      return import.meta.resolve(name);
    } catch {
      return new URL(fallback, import.meta.url).href;
    }
  };
  // (fallbacks: a page without kiln's import map; the same files index.html maps, which `kiln export` copies)
  return {tokenizers: resolve("@huggingface/tokenizers",
                              "./node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs"),
          jinja: resolve("@huggingface/jinja", "./node_modules/@huggingface/jinja/dist/index.js"),
          xgrammar: resolve("@mlc-ai/web-xgrammar", "./node_modules/@mlc-ai/web-xgrammar/lib/index.js")};
}

/** A queue the worker fills and a `for await` drains. */
class Stream {
  constructor(onReturn) {
    this.items = [];
    this.waiting = null;
    this.ended = false;
    this.error = null;
    this.onReturn = onReturn;
  }

  push(item) { this.items.push(item); this._wake(); }
  end(error = null) { this.ended = true; this.error = error; this._wake(); }
  _wake() { if (this.waiting) { this.waiting(); this.waiting = null; } }

  async* [Symbol.asyncIterator]() {
    try {
      for (;;) {
        if (this.items.length) { yield this.items.shift(); continue; }
        if (this.ended) { if (this.error) throw this.error; return; }
        await new Promise((r) => { this.waiting = r; });
      }
    } finally {
      if (!this.ended) this.onReturn();   // the consumer left early: stop generating
    }
  }
}

class Engine {
  constructor(worker, info, model) {
    this.worker = worker;
    this.info = info;
    this.model = model;
    this.selftest = info.selftest;
    this.lost = null;
    this.onDeviceLost = null;
    this._next = 0;
    this._active = new Map();   // request id -> handlers
    this.chat = {completions: {create: (req) => this._create(req, "chat")}};
    this.completions = {create: (req) => this._create(req, "text")};
  }

  _onMessage(msg) {
    if (msg.type === "lost") {
      this.lost = msg.message;
      for (const h of this._active.values()) h.fail(new DeviceLostError(msg.message));
      this._active.clear();
      this.onDeviceLost?.(msg.message);
      return;
    }
    const h = this._active.get(msg.id);
    if (!h) return;
    if (msg.type === "token") h.token(msg.token);
    else if (msg.type === "accepted") h.accepted();
    else if (msg.type === "done") { this._active.delete(msg.id); h.done(msg.done); }
    else if (msg.type === "error") { this._active.delete(msg.id); h.fail(errorFromJson(msg.error)); }
  }

  /** kind "chat" (messages) or "text" (prompt). Resolves to an async iterable of chunks when stream is set.
   *  @param {import("./types.js").ChatCompletionRequest | import("./types.js").CompletionRequest} req
   *  @param {"chat" | "text"} kind */
  async _create(req, kind) {
    if (this.lost) throw new DeviceLostError(this.lost);
    if (kind === "chat" && !(Array.isArray(req.messages) && req.messages.length)) {
      throw new TypeError("chat.completions.create: `messages` must be a non-empty array of {role, content}");
    }
    if (kind === "text" && !(typeof req.prompt === "string" || Array.isArray(req.prompt))) {
      throw new TypeError("completions.create: `prompt` must be a string or an array of token ids");
    }
    const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-${++this._next}`;
    const created = Math.floor(Date.now() / 1000);
    const model = req.model || this.model;
    const topN = kind === "chat" ? (req.logprobs ? (req.top_logprobs ?? 0) || 1 : 0) : (req.logprobs ?? 0);
    const params = SamplingParams.fromRequest(req);                                  // throws InvalidParameterError
    refuseUnimplemented(req, kind);
    let plan = null, messages = req.messages;                 // tools (chat): tools.js, as runtime_py/api.py
    if (kind === "chat") {
      plan = planTools(req.tools ?? null, req.tool_choice ?? null);
      if (plan !== null) {
        if (params.constrained) {
          throw new InvalidParameterError("a reply with tools is constrained to the tool-call format already; give " +
                                          "tools or an output constraint, not both", "response_format");
        }
        params.response_format = plan.response_format;
      }
      if (plan !== null || messages.some((m) => m?.role === "tool" || m?.tool_calls)) {
        messages = renderMessages(messages, plan);
      }
    } else if (req.tools != null || req.tool_choice != null) {
      throw new InvalidParameterError("tools are for chat completions", req.tools != null ? "tools" : "tool_choice");
    }
    const request = {params: {...params}, logprobs: topN};
    if (kind === "chat") {
      Object.assign(request, {messages, parse_special: Boolean(req.parse_special)});
      if (plan !== null) request.tools = plan.tools;
    } else {
      request.prompt = req.prompt;
    }
    /** (message fields, finish_reason) of a finished chat reply: tool calls parsed out when tools are in play. */
    const reply = (text, finish) => {
      if (plan === null) return [{content: text}, finish];
      const [content, calls] = parseReply(text, plan);
      return calls.length ? [{content: null, tool_calls: calls}, "tool_calls"] : [{content}, finish];
    };

    const base = {id, object: kind === "chat" ? "chat.completion.chunk" : "text_completion", created, model};
    const logprobsOf = (t) => (t.top_logprobs ? {content: [{token: t.piece, logprob: t.top_logprobs.find(
      ([i]) => i === t.id)?.[1] ?? null, top_logprobs: t.top_logprobs.map(([, lp, token]) => ({token, logprob: lp}))}]}
      : null);
    const choice = (t) => (kind === "chat"
      ? {index: 0, delta: {content: t.text}, logprobs: logprobsOf(t), finish_reason: null}
      : {index: 0, text: t.text, logprobs: logprobsOf(t), finish_reason: null});
    const usageOf = (d) => ({prompt_tokens: d.prompt_ids.length, completion_tokens: d.ids.length,
                             total_tokens: d.prompt_ids.length + d.ids.length,
                             prompt_tokens_details: {cached_tokens: d.timings.cached_tokens ?? 0},
                             ...(d.timings.speculate ? {speculative: {   // as the native server's (schemas.py)
                               draft_tokens: d.timings.draft_tokens, accepted_tokens: d.timings.accepted_tokens,
                               acceptance_rate: d.timings.acceptance_rate}} : {})});

    const sent = new Promise((resolve, reject) => {
      const stream = req.stream ? new Stream(() => this.interrupt(id)) : null;
      const text = [], logprobs = [];
      let first = true, started = false;
      this._active.set(id, {
        token: (t) => {
          if (stream && plan !== null) {                    // a tool-call reply is sent whole at the end
            text.push(t.text);
          } else if (stream) {
            const c = choice(t);
            if (first && kind === "chat") c.delta.role = "assistant";
            first = false;
            stream.push({...base, choices: [c]});
          } else {
            text.push(t.text);
            if (t.top_logprobs) logprobs.push(...logprobsOf(t).content);
          }
        },
        done: (d) => {
          const kiln = {prompt_ids: d.prompt_ids, ids: d.ids, timings: d.timings};
          if (stream) {
            if (!started) { started = true; resolve(stream); }   // interrupted while queued: an empty stream
            let finish = d.finish_reason;
            if (plan !== null) {
              const [fields, f] = reply(text.join(""), finish);
              finish = f;
              const delta = fields.tool_calls
                ? {role: "assistant", tool_calls: fields.tool_calls.map((c, index) => ({index, ...c}))}
                : {role: "assistant", content: fields.content};
              stream.push({...base, choices: [{index: 0, delta, logprobs: null, finish_reason: null}]});
            }
            const c = kind === "chat" ? {index: 0, delta: {}, logprobs: null, finish_reason: finish}
              : {index: 0, text: "", logprobs: null, finish_reason: finish};
            stream.push({...base, choices: [c]});
            stream.push({...base, choices: [], usage: usageOf(d), kiln});
            stream.end();
          } else {
            const lp = logprobs.length ? {content: logprobs} : null;
            const [fields, finish] = reply(text.join(""), d.finish_reason);
            const c = kind === "chat"
              ? {index: 0, message: {role: "assistant", ...fields}, logprobs: lp, finish_reason: finish}
              : {index: 0, text: text.join(""), logprobs: lp, finish_reason: d.finish_reason};
            resolve({...base, object: kind === "chat" ? "chat.completion" : "text_completion", choices: [c],
                     usage: usageOf(d), kiln});
          }
        },
        accepted: () => { if (stream) { started = true; resolve(stream); } },   // a constrained stream: compiled
        fail: (e) => (started ? stream.end(e) : reject(e)),
      });
      // a stream starts at once, except with a constraint: one the engine rejects rejects the call (a 400 natively)
      if (stream && !params.constrained) { started = true; resolve(stream); }
    });
    this.worker.postMessage({type: "generate", id, request});
    return sent;
  }

  /** Stop the running (and queued) generations after their current token; their streams end normally. */
  interrupt(id = null) {
    const ids = id ? [id] : [...this._active.keys()];
    if (ids.length) this.worker.postMessage({type: "interrupt", ids});
  }

  /** Forget the conversation the engine's KV cache holds: the next request prefills its whole prompt. Runs after
   *  the requests already sent. */
  resetChat() { this.worker.postMessage({type: "reset"}); }

  /** Frees the GPU device and the worker. */
  unload() {
    this.worker.postMessage({type: "unload"});
    this.worker.terminate();
  }

  /** Destroys the device as a driver reset would, to exercise the device-lost path (tests, demo). */
  simulateDeviceLoss() { this.worker.postMessage({type: "debug:lose-device"}); }
}

/** A module worker running worker.js. Workers must be same-origin: a page that imports this file from another origin
 *  (the exported site on a CDN) gets a same-origin blob worker importing worker.js (CORS, as every module here). */
function startWorker(workerUrl) {
  if (workerUrl.origin === globalThis.location.origin) return new Worker(workerUrl, {type: "module", name: "kiln"});
  const boot = new Blob([`import ${JSON.stringify(workerUrl.href)};`], {type: "text/javascript"});
  return new Worker(URL.createObjectURL(boot), {type: "module", name: "kiln"});
}

/**
 * Loads the compiled model at `modelUrl` (the directory holding manifest.json) in a new worker. The package's entry
 * point: types in types.js, README "Use the runtime from your page".
 * options: onProgress({phase: "manifest"|"download"|"compile"|"selftest", loaded, total, fromCache, note}),
 *          onDeviceLost(message), ctx (context tokens, default 2048), selftest: "report" (default) | "strict"
 *          (reject with SelfTestError on mismatch) | "off"; activations: "f32" (default, exact) | "int8" (CPU
 *          adapters with WGSL packed_4x8_integer_dot_product: 8-bit mat-vec inputs, faster, approximate; otherwise
 *          f32 runs and engine.info.activations_note says why); speculate: null (default) | "ngram" (speculative
 *          decoding by prompt lookup, exact: web/speculate.js; timings and usage.speculative report the acceptance).
 * `modelUrl` is resolved against the page's URL and may be on another origin (which must send CORS headers).
 * @param {string | URL} modelUrl
 * @param {import("./types.js").EngineOptions} [options]
 * @returns {Promise<import("./types.js").Engine>}
 */
export async function createEngine(modelUrl, {onProgress = () => {}, onDeviceLost = null, ctx = null,
                                              selftest = "report", model = null, speculate = null,
                                              activations = "f32"} = {}) {
  if (!["f32", "int8"].includes(activations)) {
    throw new InvalidParameterError(`activations must be "f32" or "int8" (got ${JSON.stringify(activations)})`,
                                    "activations");
  }
  if (speculate !== null && speculate !== "ngram") {   // a draft model runs natively only (runtime_py/speculate.py)
    throw new InvalidParameterError(`speculate: the browser runtime drafts by prompt lookup only ("ngram"; got ` +
                                    `${JSON.stringify(speculate)}); a draft model runs natively: ` +
                                    "`kiln run --speculate MODEL`", "speculate");
  }
  const workerUrl = new URL("./worker.js", import.meta.url);
  const worker = startWorker(workerUrl);
  const url = new URL(modelUrl, globalThis.location.href).href;
  let engine = null;
  const info = await new Promise((resolve, reject) => {
    worker.onmessage = ({data: msg}) => {
      if (engine) return engine._onMessage(msg);
      if (msg.type === "progress") onProgress(msg.progress);
      else if (msg.type === "loaded") resolve(msg.info);
      else if (msg.type === "load-error") reject(errorFromJson(msg.error));
      else if (msg.type === "lost") reject(new DeviceLostError(msg.message));
    };
    worker.onerror = async (e) => {   // a worker script the host serves wrongly gives no message: find out why
      const problem = e.message ? null : await moduleProblem(workerUrl.href);
      reject(new (problem ? ERRORS.ServerConfigError : KilnError)(
        `the engine worker failed to start: ${problem || e.message || "script error"}`));
    };
    worker.postMessage({type: "load", modelUrl: url, libs: libUrls(), options: {ctx, selftest, activations, speculate}});
  }).catch((e) => { worker.terminate(); throw e; });
  engine = new Engine(worker, info, model || info.name);
  engine.onDeviceLost = onDeviceLost;
  worker.onerror = (e) => {   // an uncaught error in the worker: nothing it was doing will finish
    for (const h of engine._active.values()) h.fail(new KilnError(`the engine worker failed: ${e.message}`));
    engine._active.clear();
  };
  if (selftest === "strict" && !info.selftest.ok) {
    engine.unload();
    throw new ERRORS.SelfTestError(selftestMessage(info.selftest));
  }
  return engine;
}

/** One line explaining a failed self-test. */
export function selftestMessage(st) {
  if (st.ok) return st.skipped ? `self-test skipped: ${st.skipped}` : `self-test passed (max |Δlogit| ${st.max_diff.toExponential(1)})`;
  const worst = st.rows.map(([id, want, got]) => `token ${id}: ${want.toFixed(3)} expected, ${Number(got).toFixed(3)} here`);
  return `self-test FAILED: this GPU/browser computes different logits than the reference (${st.reference_device || "native"}): ` +
    `max |Δlogit| ${st.max_diff} > ${st.tolerance}; argmax ${st.argmax} (expected ${st.expected_argmax}). ` +
    `Output is likely to be wrong. ${worst.slice(0, 2).join("; ")}`;
}
