// The engine's home: a module Web Worker holding the GPU device, the model, the tokenizer and one session, so
// downloads, hashing, shader compilation and the decode loop never block the page. api.js is its only client.
// The session outlives requests: its KV cache keeps the conversation, and a request whose prompt starts with what it
// holds prefills only the rest (kvcache.js), so chat turn N costs turn N's tokens.
//
// Messages in:   {type: "load", modelUrl, libs: {tokenizers, jinja, xgrammar}, options: {ctx, selftest}}
//                {type: "generate", id, request: {prompt | messages, params, logprobs, tools?}}   params: SamplingParams
//                (messages already in tools.js's rendering when tools are in play; `tools` for templates that read it)
//                {type: "interrupt", ids}     stop these requests after their current token
//                {type: "reset"}              forget the conversation the session holds (after queued requests)
//                {type: "unload"}             destroy the device (not reported as a loss)
//                {type: "debug:lose-device"}  destroy the device as a driver reset would (tests, demo)
// Messages out:  {type: "progress", progress} | {type: "loaded", info} | {type: "load-error", error}
//                {type: "accepted", id}  (a constrained request: its grammar compiled)
//                {type: "token", id, token} | {type: "done", id, done} | {type: "error", id, error}
//                {type: "lost", message}
// Errors travel as errors.js errorToJson makes them ({name, message, param?}); api.js turns them back into their
// classes with errorFromJson.

import {chatPromptIds} from "./chat.js";
import {DeviceLostError, errorToJson} from "./errors.js";
import {Model, selftest} from "./engine.js";
import {generate} from "./generate.js";
import {constraintFor, useGrammarEngine} from "./grammar.js";
import {fetchVerified, importModule} from "./loader.js";
import {SamplingParams} from "./sampler.js";
import {drafterFor} from "./speculate.js";
import {Tokenizer} from "./tokenizer.js";
import {templateTakesTools} from "./tools.js";

let model = null, tokenizer = null, session = null, jinja = null, speculate = null;
const interrupted = new Set();
let queue = Promise.resolve();   // requests run one at a time, in arrival order

const post = (msg) => self.postMessage(msg);

async function load({modelUrl, libs, options = {}}) {
  const t0 = performance.now();
  // importModule: a host serving .mjs with a wrong Content-Type fails here with a ServerConfigError saying so
  const [tokLib, jinjaLib] = await Promise.all([importModule(libs.tokenizers), importModule(libs.jinja)]);
  jinja = jinjaLib;
  useGrammarEngine(libs.xgrammar);   // imported on the first constrained request (1 MB of wasm)
  const onProgress = (progress) => post({type: "progress", progress});
  model = await Model.load(modelUrl, {ctx: options.ctx, activations: options.activations || "f32", onProgress,
                                      onLost: (message) => post({type: "lost", message})});
  const m = model.manifest;
  const tokJson = await fetchVerified(model.baseUrl, m.tokenizer.file, m.tokenizer.sha256, "tokenizer");
  tokenizer = new Tokenizer(tokLib, JSON.parse(new TextDecoder().decode(tokJson)), m.tokenizer);
  let st = {ok: true, skipped: "disabled"};
  if (options.selftest !== "off") {
    onProgress({phase: "selftest"});
    st = await selftest(model);
  }
  session = model.session(options.ctx);
  speculate = options.speculate || null;   // "ngram": every request decodes speculatively (speculate.js)
  return {
    name: m.model.name, arch: m.model.arch, url: model.baseUrl, adapter: model.adapter, ctx: session.ctx,
    weights_bytes: m.shards.reduce((s, x) => s + x.bytes, 0), kernels: Object.keys(m.kernels).length,
    dispatches_per_token: m.programs.decode.length, selftest: st,
    activations: model.activations, activations_note: model.activationsNote,
    load_s: Math.round(performance.now() - t0) / 1000,
  };
}

/** The prompt ids of a request: chat messages through the template, a text prompt, or ids as they are. */
function promptIds(request) {
  if (request.messages) {
    const extra = request.tools && templateTakesTools(model.manifest.chat_template) ? {tools: request.tools} : {};
    return chatPromptIds(jinja, tokenizer, model.manifest, request.messages,   // contents as text unless parse_special
                         {parseSpecial: Boolean(request.parse_special), ...extra});
  }
  if (Array.isArray(request.prompt)) return request.prompt.map(Number);
  return tokenizer.encode(String(request.prompt ?? ""));
}

async function run(id, request) {
  if (!session) throw new Error("no model loaded");
  if (model.lost) throw new DeviceLostError(model.lost);
  const ids = promptIds(request);
  if (interrupted.has(id)) {   // stopped while it waited in the queue
    post({type: "done", id, done: {type: "done", ids: [], text: "", finish_reason: "stop", timings: {}, prompt_ids: ids}});
    return;
  }
  const params = new SamplingParams(request.params || {});
  if (params.constrained) {     // compiled (and cached) before anything runs: a rejected grammar is the call's error
    await constraintFor(params, tokenizer);
    post({type: "accepted", id});
  }
  const events = generate(session, tokenizer, ids, params, {
    logprobs: request.logprobs || 0, eogIds: [...tokenizer.eog_ids],
    shouldStop: () => interrupted.has(id), speculate: speculate ? drafterFor(speculate) : null});
  for await (const ev of events) {
    if (ev.type === "token") {
      const token = {...ev, piece: ev.id >= 0 && request.logprobs ? tokenizer.decode([ev.id]) : undefined};
      if (ev.top_logprobs) token.top_logprobs = ev.top_logprobs.map(([i, lp]) => [i, lp, tokenizer.decode([i])]);
      post({type: "token", id, token});
    } else {
      post({type: "done", id, done: {...ev, prompt_ids: ids}});
    }
  }
}

self.onmessage = async ({data: msg}) => {
  switch (msg.type) {
    case "load":
      try {
        post({type: "loaded", info: await load(msg)});
      } catch (e) {
        console.error(e);
        post({type: "load-error", error: errorToJson(e)});
      }
      break;
    case "generate":
      queue = queue.then(() => run(msg.id, msg.request)).catch((e) => post({type: "error", id: msg.id,
                                                                            error: errorToJson(e)}))
        .finally(() => interrupted.delete(msg.id));
      break;
    case "reset":
      queue = queue.then(() => session?.reset());
      break;
    case "interrupt":
      for (const id of msg.ids) interrupted.add(id);
      break;
    case "unload":
      model?.destroy();
      model = session = null;
      break;
    case "debug:lose-device":
      model?.device.destroy();   // model.disposed stays false, so device.lost reports it like a driver reset
      break;
  }
};
