// The decode loop: prefill the prompt, then choose / feed one token at a time until EOS, a stop string or the limit.
// Mirrors runtime_py/generate.py step for step (same names, same order of operations).
//
//   for await (const ev of generate(session, tokenizer, promptIds, params, {maxTokens: 64})) ...
//   // ev: {type: "token", ...} events, then one {type: "done", ...}

import {ContextOverflowError} from "./device.js";
import {FINISH_GRAMMAR, constraintFor} from "./grammar.js";
import {gpuReason, LP_MAX} from "./gpu_sampling.js";
import {reusePrefix} from "./kvcache.js";
import {Sampler, topLogprobs} from "./sampler.js";
import {generateSpeculative} from "./speculate.js";

// several decode steps per submit when sampling runs on the GPU (runtime_py/generate.py: the same schedule)
const STREAM_INTERVAL_S = 0.1;
const MIN_STEPS = 8;

/** Finds stop strings in streamed text; holds back a tail that could still become one. */
export class StopStrings {
  constructor(stops) {
    this.stops = (stops || []).filter(Boolean);
    this.text = "";      // all text so far
    this.emitted = 0;    // chars released to the caller
  }

  feed(delta) {
    this.text += delta;
    // the earliest stop wins, whichever string it is (one delta may complete several)
    const hits = this.stops.map((s) => this.text.indexOf(s, Math.max(0, this.emitted - s.length))).filter((i) => i >= 0);
    if (hits.length) {
      const i = Math.min(...hits);
      const out = this.text.slice(this.emitted, i);
      [this.text, this.emitted] = [this.text.slice(0, i), i];
      return [out, true];
    }
    let hold = 0;
    for (const s of this.stops) {   // longest suffix of text that is a proper prefix of a stop string
      for (let n = Math.min(s.length - 1, this.text.length); n > 0; n--) {
        if (this.text.endsWith(s.slice(0, n))) { hold = Math.max(hold, n); break; }
      }
    }
    const end = Math.max(this.emitted, this.text.length - hold);
    const out = this.text.slice(this.emitted, end);
    this.emitted = end;
    return [out, false];
  }

  flush() {
    const out = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return out;
  }
}

const now = () => performance.now() / 1000;
const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;

/**
 * Yields {type: "token", id, text, top_logprobs} events then one {type: "done", ids, text, finish_reason, timings}.
 * The prompt's leading tokens that the session's cache already holds are kept (kvcache.js; reuse false: the session
 * starts at position 0) and only the rest is prefilled. Same order of operations as generate.py.
 * maxTokens overrides params.max_tokens; both null: until EOS, a stop string or the end of the context.
 */
export async function* generate(session, tokenizer, promptIds, params, {maxTokens = null, logprobs = 0, eogIds = [],
                                                                        shouldStop = () => false, reuse = true,
                                                                        speculate = null} = {}) {
  if (!promptIds.length) throw new ContextOverflowError("empty prompt: nothing to condition on");
  if (promptIds.length >= session.ctx) {
    throw new ContextOverflowError(`prompt is ${promptIds.length} tokens but the context holds ${session.ctx} ` +
      "(use a shorter prompt or a larger context)");
  }
  const room = session.ctx - promptIds.length;
  maxTokens = maxTokens ?? params.max_tokens ?? null;
  maxTokens = maxTokens === null ? room : Math.min(maxTokens, room);
  if (speculate !== null) {   // a drafter (speculate.js): the same loop, several tokens verified per pass
    yield* generateSpeculative(session, tokenizer, promptIds, params, speculate, {maxTokens, logprobs, eogIds,
                                                                                  shouldStop, reuse});
    return;
  }
  const sampler = new Sampler(params);
  const constraint = await constraintFor(params, tokenizer);   // response_format / grammar / regex: a mask per step
  const matcher = constraint !== null ? await constraint.matcher() : null;
  const fastGreedy = params.greedy && !logprobs && params.repeat_penalty === 1 && !params.presence_penalty &&
    !params.frequency_penalty && matcher === null;             // masks: the CPU sampling path
  const decoder = tokenizer.streamDecoder(), stops = new StopStrings(params.stop);
  const history = [...promptIds], outIds = [], text = [];
  const eog = new Set(eogIds);

  const onGpu = typeof session.gpuSampling === "function" && session.gpuSampling() &&
    gpuReason(params, session.sampleLimits) === null && logprobs <= LP_MAX && matcher === null;   // masks: CPU
  const t0 = now();
  let cached;
  if (reuse) {
    cached = reusePrefix(session, promptIds);
  } else {
    session.reset();
    cached = 0;
  }
  let gpuTokens = null;
  if (onGpu) gpuTokens = gpuTokenStream(session, promptIds, cached, params, logprobs, maxTokens);
  else session.forward(promptIds.slice(cached));
  let tFirst = null, finish = "length", cut = false;
  while (outIds.length < maxTokens) {
    let tok, lp = null;
    if (onGpu) {
      [tok, lp] = (await gpuTokens.next()).value;
    } else if (fastGreedy) {
      tok = await session.nextToken();
    } else {
      const mask = matcher !== null ? await matcher.mask() : null;
      if (matcher !== null && mask === null) { finish = FINISH_GRAMMAR; break; }
      const logits = await session.logits();
      tok = sampler.sample(logits, history, mask);
      if (logprobs) lp = topLogprobs(logits, logprobs);
    }
    if (tFirst === null) tFirst = now();
    if (eog.has(tok)) { finish = "stop"; break; }
    if (matcher !== null) matcher.consume(tok);
    outIds.push(tok);
    history.push(tok);
    let delta;
    [delta, cut] = stops.feed(decoder.push(tok));
    text.push(delta);
    yield {type: "token", id: tok, text: delta, top_logprobs: lp};
    if (cut || shouldStop() || (matcher !== null && await matcher.done())) { finish = "stop"; break; }
    if (outIds.length < maxTokens && !onGpu) session.forward([tok]);
  }
  if (!cut) {   // release what was held back: an unfinished UTF-8 sequence, a possible stop-string prefix
    let tail;
    [tail, cut] = stops.feed(decoder.flush());
    tail += cut ? "" : stops.flush();
    if (cut) finish = "stop";
    if (tail) {
      text.push(tail);
      yield {type: "token", id: -1, text: tail, top_logprobs: null};   // id -1: text released at the end
    }
  }
  matcher?.dispose();
  const tEnd = now(), n = outIds.length;
  const timings = {
    prompt_tokens: promptIds.length, cached_tokens: cached, generated_tokens: n,
    ttft_s: round((tFirst ?? tEnd) - t0, 4),
    prefill_tok_s: round((promptIds.length - cached) / Math.max((tFirst ?? tEnd) - t0, 1e-9), 2),
    decode_tok_s: n > 1 && tFirst !== null ? round((n - 1) / (tEnd - tFirst), 2) : null,
    total_s: round(tEnd - t0, 4),
  };
  yield {type: "done", ids: outIds, text: text.join(""), finish_reason: finish, timings};
}


/**
 * Yields [id, top logprobs or null] sampled on the GPU, reading the ring once per submit (generate.py _gpu_tokens).
 * The caller stops at EOS / a stop string / the limit; tokens of the last submit past that are dropped.
 */
async function* gpuTokenStream(session, promptIds, cached, params, logprobs, maxTokens) {
  session.beginSampling(params, promptIds, logprobs);
  const ring = session.sampleLimits.ring;
  let batch = await session.prefillSample(promptIds.slice(cached)), made = 1, n = 1, target = ring;   // rest cached
  while (true) {
    for (const [tok, , tops] of batch) yield [tok, logprobs ? tops : null];
    if (made >= maxTokens) return;
    n = Math.min(2 * n, target, maxTokens - made);
    const t = now();
    batch = await session.decodeSample(n);
    const stepS = (now() - t) / n;
    target = Math.min(ring, Math.max(MIN_STEPS, Math.floor(STREAM_INTERVAL_S / Math.max(stepS, 1e-9))));
    made += n;
  }
}
