// Next-token choice from logits. Mirrors runtime_py/sampling.py line for line, including the random generator, so the
// same seed gives the same tokens natively and in the browser.
//
// Order (llama.cpp's default chain): penalties -> top-k -> top-p -> min-p -> temperature -> draw.
// top-p and min-p look at the untempered distribution, as llama.cpp does; temperature 0 means greedy.
// Arithmetic is float64 like numpy's, and sums over many terms use numpy's pairwise summation, so the two runtimes
// agree bit for bit except where Math.exp and the C library's exp differ in the last place.

import {applyMask} from "./grammar.js";
import {InvalidParameterError} from "./errors.js";

// The request table: OpenAI / llama.cpp request fields -> SamplingParams. The same rows as runtime_py/sampling.py's
// REQUEST_TABLE, where the table is written out with its meaning (defaults, aliases, ranges, request-only rules);
// tests/e2e/test_mirrors.py compares the two and feeds both the same requests.
export const REQUEST_TABLE = [
  {field: "temperature", names: ["temperature"], type: "number", min: 0, max: null, request_max: 2},
  {field: "top_k", names: ["top_k"], type: "integer", min: null, max: null},
  {field: "top_p", names: ["top_p"], type: "number", min: 0, max: 1, min_open: true, request_min_open: false},
  {field: "min_p", names: ["min_p"], type: "number", min: 0, max: 1},
  {field: "repeat_penalty", names: ["repetition_penalty", "repeat_penalty"], type: "number", min: 0, max: null,
   min_open: true},
  {field: "repeat_last_n", names: ["repeat_last_n"], type: "integer", min: -1, max: null},
  {field: "presence_penalty", names: ["presence_penalty"], type: "number", min: -2, max: 2},
  {field: "frequency_penalty", names: ["frequency_penalty"], type: "number", min: -2, max: 2},
  {field: "seed", names: ["seed"], type: "integer|null", min: null, max: null},
  {field: "stop", names: ["stop"], type: "stop", request_max_items: 4},
  {field: "max_tokens", names: ["max_tokens", "max_completion_tokens"], type: "integer|null", min: 1, max: null},
  {field: "response_format", names: ["response_format"], type: "response_format"},
  {field: "grammar", names: ["grammar"], type: "string|null"},
  {field: "regex", names: ["regex"], type: "string|null"},
];
export const RESPONSE_FORMATS = ["text", "json_object", "json_schema"];

export class SamplingParams {
  constructor({temperature = 0.7, top_k = 40, top_p = 0.95, min_p = 0.05, repeat_penalty = 1.0, repeat_last_n = 64,
               presence_penalty = 0.0, frequency_penalty = 0.0, seed = null, stop = [], max_tokens = null,
               response_format = null, grammar = null, regex = null, logit_bias = {}} = {}) {
    Object.assign(this, {temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                         frequency_penalty, seed, stop, max_tokens, response_format, grammar, regex, logit_bias});
  }

  /** An OpenAI / llama.cpp style request (other keys ignored) -> validated params, by REQUEST_TABLE.
   *  Mirrors runtime_py/sampling.py `SamplingParams.from_request`. */
  static fromRequest(req) {
    const kw = {};
    for (const row of REQUEST_TABLE) {
      const given = row.names.filter((n) => req[n] !== undefined && req[n] !== null)
        .map((n) => [n, check(row, n, req[n], true)]);
      if (!given.length) continue;
      const [[name, value], ...others] = given;
      for (const [other, v] of others) {
        if (!sameValue(v, value)) {
          throw new InvalidParameterError(`${name} and ${other} are two names for one setting and were given ` +
                                          `different values (${show(value)}, ${show(v)}); give one`, other);
        }
      }
      kw[row.field] = value;
    }
    const p = new SamplingParams(kw);
    if (p.top_p === 0) [p.top_p, p.top_k] = [1.0, 1];   // OpenAI accepts 0: only the most likely token
    return p.validate();
  }

  validate() {
    for (const row of REQUEST_TABLE) check(row, row.field, this[row.field]);
    const given = ["response_format", "grammar", "regex"].filter((n) => this[n] !== null
      && !(n === "response_format" && this.response_format.type === "text"));
    if (given.length > 1) {
      throw new InvalidParameterError(`${given[0]} and ${given[1]} are two output constraints; give one`, given[1]);
    }
    return this;
  }

  /** An output constraint is set (a grammar mask is applied each step: the CPU sampling path). */
  get constrained() {
    const rf = this.response_format;
    return (rf !== null && rf.type !== "text") || this.grammar !== null || this.regex !== null;
  }

  get greedy() { return this.temperature === 0; }
}

/** A value as Python's json.dumps writes it, so both runtimes word their messages alike. */
const show = (value) => JSON.stringify(value);
const sameValue = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** `value` of table row `row` (given as `name`), type- and range-checked; returns it normalised. */
function check(row, name, value, request = false) {
  const kind = row.type;
  if (kind === "stop") {
    value = typeof value === "string" ? [value] : value;
    if (!Array.isArray(value) || !value.every((s) => typeof s === "string")) {
      throw new InvalidParameterError(`${name} must be a string or a list of strings`, name);
    }
    const limit = request ? row.request_max_items ?? null : null;
    if (limit !== null && value.length > limit) {
      throw new InvalidParameterError(`${name} takes at most ${limit} strings (got ${value.length})`, name);
    }
    return [...value];
  }
  if (value === null && (kind.endsWith("|null") || kind === "response_format")) return null;
  if (kind === "response_format") return checkResponseFormat(name, value);
  if (kind === "string|null") {
    if (typeof value !== "string") throw new InvalidParameterError(`${name} must be a string (got ${show(value)})`, name);
    return value;
  }
  const number = typeof value === "number";
  if (kind.startsWith("integer")) {
    if (!number || !Number.isInteger(value)) {
      throw new InvalidParameterError(`${name} must be an integer (got ${show(value)})`, name);
    }
  } else if (!number) {
    throw new InvalidParameterError(`${name} must be a number (got ${show(value)})`, name);
  }
  const lo = row.min ?? null, hi = (request && "request_max" in row ? row.request_max : row.max) ?? null;
  const loOpen = (request && "request_min_open" in row ? row.request_min_open : row.min_open) ?? false;
  const ok = (lo === null || (loOpen ? value > lo : value >= lo)) && (hi === null || value <= hi);
  if (!ok) {   // also NaN, which compares false
    const range = hi === null ? `${loOpen ? ">" : ">="} ${lo}` : `in ${loOpen ? "(" : "["}${lo}, ${hi}]`;
    throw new InvalidParameterError(`${name} must be ${range} (got ${show(value)})`, name);
  }
  return value;
}

/** OpenAI's shape, as runtime_py/sampling.py `_check_response_format`; the schema itself is the engine's to check. */
function checkResponseFormat(name, value) {
  const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
  if (!isObject(value) || !RESPONSE_FORMATS.includes(value.type)) {
    const got = isObject(value) ? value.type ?? null : value;
    throw new InvalidParameterError(`${name}.type must be one of ${RESPONSE_FORMATS.join(", ")} (got ${show(got)})`,
                                    name);
  }
  if (value.type === "json_schema" && !(isObject(value.json_schema) && isObject(value.json_schema.schema))) {
    throw new InvalidParameterError(`${name}.json_schema.schema must be a JSON object (a JSON Schema)`, name);
  }
  return value;
}

export const GREEDY = new SamplingParams({temperature: 0, top_k: 0, top_p: 1, min_p: 0, repeat_penalty: 1});

/** Tiny 32-bit PRNG, chosen because Python computes it bit-identically; see runtime_py/sampling.py. */
export class Mulberry32 {
  constructor(seed) { this.a = seed >>> 0; }

  next() {
    this.a = (this.a + 0x6D2B79F5) >>> 0;
    let t = this.a;
    t = Math.imul(t ^ (t >>> 15), t | 1) >>> 0;
    t = (((t + Math.imul(t ^ (t >>> 7), t | 61)) >>> 0) ^ t) >>> 0;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
}

/** numpy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src), so sums round exactly as np.sum does. */
export function pairwiseSum(a, lo = 0, n = a.length - lo) {
  if (n < 8) {
    let s = -0.0;
    for (let i = 0; i < n; i++) s += a[lo + i];
    return s;
  }
  if (n <= 128) {
    const r = [a[lo], a[lo + 1], a[lo + 2], a[lo + 3], a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]];
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += a[lo + i + j];
    let s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) s += a[lo + i];
    return s;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, lo, n2) + pairwiseSum(a, lo + n2, n - n2);
}

function cumsum(a) {
  const out = new Float64Array(a.length);
  let s = 0;
  for (let i = 0; i < a.length; i++) out[i] = s += a[i];
  return out;
}

/** np.searchsorted(a, v, side): first i with a[i] >= v ("left") or a[i] > v ("right"). */
function searchsorted(a, v, side = "left") {
  let lo = 0, hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (side === "left" ? a[mid] < v : a[mid] <= v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function argmax(a) {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

/** The first k of np.argsort(-x, kind="stable"): indices by value descending, ties by index; O(n) for small k. */
export function topOrder(x, k = x.length) {
  const n = x.length;
  k = Math.min(k, n);
  let idx;
  if (k >= n / 4) {
    idx = Array.from({length: n}, (_, i) => i);
  } else {   // threshold = k-th largest value; keep everything above it and the first tied ones
    const vals = Float64Array.from(x).sort();
    const thr = vals[n - k];
    idx = [];
    let ties = k;
    for (let i = 0; i < n; i++) if (x[i] > thr) ties--;
    for (let i = 0; i < n; i++) {
      if (x[i] > thr) idx.push(i);
      else if (x[i] === thr && ties > 0) { idx.push(i); ties--; }
    }
  }
  idx.sort((i, j) => (x[j] - x[i]) || (i - j));
  return idx.slice(0, k);
}

export class Sampler {
  constructor(params) {
    this.p = params.validate();
    const seed = params.seed ?? crypto.getRandomValues(new Uint32Array(1))[0];
    this.rng = new Mulberry32(seed);
  }

  applyPenalties(logits, history) {
    const p = this.p;
    const bias = Object.entries(p.logit_bias || {});
    if (bias.length) {   // added first, as llama.cpp's sampler chain does; ids outside the vocabulary are ignored
      logits = Float64Array.from(logits);
      for (const [tok, b] of bias) if (tok >= 0 && tok < logits.length) logits[tok] += b;
    }
    const n = p.repeat_last_n < 0 ? history.length : p.repeat_last_n;
    const recent = n > 0 ? history.slice(Math.max(0, history.length - n)) : [];   // the last min(n, length) ids
    if (!recent.length || (p.repeat_penalty === 1 && !p.presence_penalty && !p.frequency_penalty)) return logits;
    logits = Float64Array.from(logits);
    const counts = new Map();
    for (const id of recent) counts.set(id, (counts.get(id) || 0) + 1);
    for (const [id, count] of counts) {
      let sel = logits[id];
      sel = sel > 0 ? sel / p.repeat_penalty : sel * p.repeat_penalty;
      sel -= count * p.frequency_penalty + p.presence_penalty;
      logits[id] = sel;
    }
    return logits;
  }

  /** logits: Float32Array (vocab,); history: prompt + generated ids; mask: Uint8Array (vocab,) of 0/1, the tokens
   *  allowed (a grammar's, web/grammar.js; at least one), others never chosen. Returns the chosen id. */
  sample(logits, history, mask = null) {
    const [order, w] = this.candidates(logits, history, mask);
    if (w === null) return order[0];
    const cdf = cumsum(w);
    const r = this.rng.next() * cdf[cdf.length - 1];
    return order[Math.min(searchsorted(cdf, r, "right"), order.length - 1)];
  }

  /** [ids, weights] of the distribution `sample` draws from: ids best first, weights unnormalised (probability
   *  = w / sum(w)); greedy: [[argmax], null]. Speculative decoding's rejection rule reads it (speculate.js). */
  candidates(logits, history, mask = null) {
    const p = this.p;
    logits = this.applyPenalties(Float64Array.from(logits), history);
    let n = logits.length;
    if (mask !== null) {
      logits = applyMask(logits, mask);
      n = logits.reduce((c, v) => c + (v > -Infinity), 0);               // the allowed ones (sorted first)
    }
    if (p.greedy) return [[argmax(logits)], null];
    let order = topOrder(logits, p.top_k > 0 ? Math.min(p.top_k, n) : n);   // candidates, best first
    let cand = Float64Array.from(order, (i) => logits[i]);
    let probs = cand.map((c) => Math.exp(c - cand[0]));
    const total = pairwiseSum(probs);
    probs = probs.map((q) => q / total);
    if (p.top_p < 1) {
      const keep = searchsorted(cumsum(probs), p.top_p) + 1;               // smallest prefix with mass >= top_p
      [order, cand, probs] = [order.slice(0, keep), cand.slice(0, keep), probs.slice(0, keep)];
    }
    if (p.min_p > 0) {
      const keep = probs.filter((q) => q >= p.min_p * probs[0]).length;
      [order, cand] = [order.slice(0, keep), cand.slice(0, keep)];
    }
    return [order, cand.map((c) => Math.exp((c - cand[0]) / p.temperature))];
  }
}

/** The model's own top-k [token id, log-probability], before any sampling adjustment (as OpenAI reports). */
export function topLogprobs(logits, k = 5) {
  const x = Float64Array.from(logits);
  let m = -Infinity;
  for (const v of x) if (v > m) m = v;
  const lse = m + Math.log(pairwiseSum(x.map((v) => Math.exp(v - m))));
  return topOrder(x, k).map((i) => [i, x[i] - lse]);
}
