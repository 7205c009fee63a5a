// The demo page: pick a compiled model, load it (progress in MB and %), chat with streaming tokens.
// Everything model-related goes through api.js; this file only drives the DOM. `window.kiln` exposes the engine for
// debugging and for the end-to-end tests. body[data-state]: starting | no-webgpu | idle | loading | ready |
// generating | error | lost.

import {createEngine, getAdapter, adapterName, selftestMessage} from "./api.js";
import {fetchJson} from "./loader.js";

const $ = (id) => document.getElementById(id);
const MB = (b) => (b / 1e6).toFixed(1);
let engine = null, models = [], history = [], generating = false;
window.kiln = {createEngine, engine: null};

function setState(s) { document.body.dataset.state = s; }

function show(id, text = null) {
  const el = $(id);
  if (text !== null) (el.querySelector("span") || el).textContent = text;
  el.hidden = false;
}

function setChatEnabled(on) {
  $("prompt").disabled = $("send").disabled = !on;
  if (on) $("prompt").placeholder = "Ask something…  (Enter sends, Shift+Enter for a new line)";
}

async function init() {
  // Say at once, before the user picks anything, when WebGPU can't work here.
  try {
    const adapter = await getAdapter();
    $("adapter").textContent = `GPU: ${adapterName(adapter)}`;
  } catch (e) {
    show("gpu-error");
    $("gpu-error-text").textContent = e.message;
    setState("no-webgpu");
    return;
  }
  try {
    // Relative: the page may live under any base path. Each model's url is relative to models.json (or absolute,
    // when `kiln export --models-url` put the models on another origin).
    models = await fetchJson(new URL("models.json", location.href).href, "the list of models");
    for (const m of models) m.url = new URL(m.url, new URL("models.json", location.href)).href;
  } catch (e) {
    show("load-error", `${e.name}: could not list models: ${e.message}`);
    $("load-error").dataset.error = e.name;
    setState("error");
    return;
  }
  const sel = $("model");
  sel.replaceChildren(...models.map((m, i) => new Option(`${m.name} (${m.arch}, ${MB(m.bytes)} MB)`, i)));
  const wanted = new URLSearchParams(location.search).get("model");
  const idx = models.findIndex((m) => m.id === wanted);
  if (idx >= 0) sel.value = idx;
  sel.disabled = $("load").disabled = models.length === 0;
  if (!models.length) show("load-error", "no compiled models are being served (kiln serve --model ..., kiln export DIR MODEL ...)");
  setState("idle");
}

let loadNote = "";   // the loader's last note (storage quota, a host without Range support): kept after the load

function onProgress(p) {
  const bar = $("progress-bar"), text = $("progress-text");
  if (p.note) loadNote = p.note;
  $("progress").hidden = false;
  if (p.phase === "download") {
    const pct = p.total ? (100 * p.loaded) / p.total : 0;
    bar.value = pct;
    const src = p.fromCache >= p.loaded && p.loaded > 0 ? "from cache" : p.fromCache ? "cache + network" : "downloading";
    text.textContent = `${src}: ${MB(p.loaded)} / ${MB(p.total)} MB (${pct.toFixed(0)}%)` + (p.note ? ` — ${p.note}` : "");
  } else {
    text.textContent = {manifest: "reading manifest…", compile: "compiling shaders…",
                        selftest: "running self-test…"}[p.phase] || p.phase;
  }
}

function onDeviceLost(message) {
  setState("lost");
  show("lost");
  $("lost-text").textContent = message;
  setChatEnabled(false);
  $("stop").disabled = true;
}

async function load() {
  const m = models[$("model").value];
  if (!m) return;
  engine?.unload();
  engine = window.kiln.engine = null;
  $("load").disabled = $("model").disabled = true;
  for (const id of ["load-error", "selftest"]) $(id).hidden = true;
  setChatEnabled(false);
  setState("loading");
  loadNote = "";
  const t0 = performance.now();
  try {
    // ?selftest=off skips the self-test (tests that only exercise loading; ~8 s of SwiftShader time)
    const selftest = new URLSearchParams(location.search).get("selftest") === "off" ? "off" : "report";
    // ?activations=int8: the CPU adapters' int8-activation kernels (approximate; engine.info.activations says which ran)
    const activations = new URLSearchParams(location.search).get("activations") === "int8" ? "int8" : "f32";
    engine = await createEngine(m.url, {onProgress, onDeviceLost, model: m.id, selftest, activations});
  } catch (e) {
    show("load-error", `${e.name}: ${e.message}`);
    $("load-error").dataset.error = e.name;
    $("progress").hidden = true;
    $("load").disabled = $("model").disabled = false;
    setState("error");
    return;
  }
  window.kiln.engine = engine;
  $("progress-bar").value = 100;
  $("progress-text").textContent = `loaded ${engine.info.name} in ${((performance.now() - t0) / 1000).toFixed(1)} s ` +
    `(${engine.info.dispatches_per_token} dispatches per token, context ${engine.info.ctx})` +
    (loadNote ? ` — ${loadNote}` : "");
  const st = engine.selftest;
  const el = $("selftest");
  el.textContent = selftestMessage(st);
  el.className = `banner ${st.ok ? "" : "warn"}`;
  el.dataset.ok = String(st.ok);
  el.hidden = false;
  $("load").disabled = $("model").disabled = false;
  history = [];
  setChatEnabled(true);
  setState("ready");
  $("prompt").focus();
}

function bubble(role, text = "") {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("messages").append(el);
  el.scrollIntoView({block: "end"});
  return el;
}

function settings() {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  return {temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"), min_p: num("min_p"),
          repetition_penalty: num("repetition_penalty"), max_tokens: num("max_tokens"), seed: num("seed")};
}

async function send(e) {
  e?.preventDefault();
  const content = $("prompt").value.trim();
  if (!engine || generating || !content) return;
  $("prompt").value = "";
  bubble("user", content);
  history.push({role: "user", content});
  const system = $("system").value.trim();
  const messages = system ? [{role: "system", content: system}, ...history] : history;
  const out = bubble("assistant");
  out.classList.add("streaming");
  generating = true;
  setState("generating");
  $("send").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "prefilling…";
  let text = "", usage = null, kiln = null, finish = null, n = 0, tFirst = null;
  const t0 = performance.now();
  try {
    const stream = await engine.chat.completions.create({messages, stream: true, ...settings()});
    for await (const chunk of stream) {
      const c = chunk.choices[0];
      if (c?.delta?.content !== undefined) {   // one chunk per token (its text may be "" mid-character)
        n++;
        tFirst ??= performance.now();
        const rate = n > 1 ? ` · ${((n - 1) / ((performance.now() - tFirst) / 1000)).toFixed(2)} tok/s` : "";
        $("stats").textContent = `generating: ${n} tokens · time to first token ` +
          `${((tFirst - t0) / 1000).toFixed(2)} s${rate}`;
      }
      if (c?.delta?.content) {
        text += c.delta.content;
        out.textContent = text;
        out.scrollIntoView({block: "end"});
      }
      if (c?.finish_reason) finish = c.finish_reason;
      if (chunk.usage) [usage, kiln] = [chunk.usage, chunk.kiln];
    }
    window.kiln.last = {...kiln, finish_reason: finish, text};
    history.push({role: "assistant", content: text});
  } catch (err) {
    bubble("note", `${err.name}: ${err.message}`);
    history.pop();
  } finally {
    out.classList.remove("streaming");
    generating = false;
    $("stop").disabled = true;
    if (!engine?.lost) {
      setChatEnabled(true);
      setState("ready");
    }
  }
  if (kiln) {
    const t = kiln.timings;
    $("stats").textContent = `${usage.completion_tokens} tokens · time to first token ${t.ttft_s.toFixed(2)} s · ` +
      `${t.decode_tok_s ?? "–"} tok/s decode · prompt ${usage.prompt_tokens} tokens, ` +
      `${usage.prompt_tokens_details.cached_tokens} cached, the rest prefilled at ${t.prefill_tok_s} tok/s` +
      (finish === "length" ? " · stopped at max_tokens" : "");
  }
}

$("load").addEventListener("click", load);
$("chat").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("stop").addEventListener("click", () => { engine?.interrupt(); $("stop").disabled = true; });
$("clear").addEventListener("click", () => {
  history = [];
  engine?.resetChat();
  $("messages").replaceChildren();
  $("stats").textContent = "";
});
$("reload").addEventListener("click", () => location.reload());
init();
