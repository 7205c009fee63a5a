// Speculative decoding, exact: a drafter guesses the next k tokens, the target model scores them all in one pass
// (the `score` program: logits of every position, engine.js Session.scoreChunks) and keeps the longest prefix it
// agrees with, plus one token of its own, so each pass yields 1..k+1 tokens. Mirrors runtime_py/speculate.py step for
// step (same names, same order of operations; see its docstring for the exactness argument).
//
//   for await (const ev of generate(session, tok, ids, params, {speculate: drafterFor("ngram")})) ...
//
// Drafter here: NgramDrafter (prompt lookup). A draft model (runtime_py/speculate.py ModelDrafter, `kiln run --draft`)
// runs natively only: drafterFor refuses it by name.
//
// The session's cache holds `history` minus the token chosen last (`pending`); a pass scores [pending] + drafts and,
// after verification, rewinds to the accepted prefix. Timings gain draft_tokens, accepted_tokens, acceptance_rate and
// passes (target forward passes after the prompt).

import {InvalidParameterError} from "./errors.js";
import {FINISH_GRAMMAR, constraintFor} from "./grammar.js";
import {reusePrefix} from "./kvcache.js";
import {Sampler, topLogprobs} from "./sampler.js";

export const DRAFT_K = 7;                 // most tokens drafted per pass: [pending] + 7 = one CPU-adapter x window
export const NGRAM_MAX = 5, NGRAM_MIN = 2;   // longest match first; a one-token match drafts noise more often than not
// a score pass of [pending] + k drafts costs about c0 + c1 k decode steps, per adapter class (speculate.py PASS_COST)
export const PASS_COST = {cpu: [1.0, 0.33], gpu: [1.0, 0.1]};

/** Adaptive draft length (speculate.py DraftLength): the k in 0..kMax with the most expected tokens per unit of
 *  cost, from an exponential average of the drafts' per-token acceptance; k = 0 is a plain step, whose token still
 *  checks the drafter's first guess (`probe`). */
export class DraftLength {
  static WEIGHT = 0.2;   // of each draft token's outcome in the average

  constructor(kMax, cost = PASS_COST.gpu) {
    this.kMax = kMax;
    [this.c0, this.c1] = cost;
    this.acceptance = 0.5;   // prior
  }

  k() {
    const a = Math.min(this.acceptance, 0.999);
    let best = 0, bestV = 1.0;
    for (let k = 1; k <= this.kMax; k++) {
      const v = (1 - a ** (k + 1)) / (1 - a) / (this.c0 + this.c1 * k);
      if (v > bestV) { best = k; bestV = v; }
    }
    return best;
  }

  _trial(hit) { this.acceptance += DraftLength.WEIGHT * ((hit ? 1 : 0) - this.acceptance); }

  /** A pass: `kept` of `drafted` drafts accepted (the first rejection ends the trials). */
  update(drafted, kept) {
    for (let i = 0; i < kept; i++) this._trial(true);
    if (kept < drafted) this._trial(false);
  }

  probe(hit) { this._trial(hit); }
}

export class NgramDrafter {
  /** k: the most tokens per draft; adaptive: fewer (or none) as the acceptance falls (DraftLength). */
  constructor(k = DRAFT_K, nMax = NGRAM_MAX, nMin = NGRAM_MIN, adaptive = true) {
    Object.assign(this, {name: "ngram", k, nMax, nMin, adaptive});
  }

  /** The k ids that followed the latest earlier occurrence of history's last n ids (longest n first). */
  draft(history, k) {
    const h = history, L = h.length;
    for (let n = Math.min(this.nMax, L - 1); n >= this.nMin; n--) {
      // windows h[i:i+n] for i < L - n (not the tail itself), latest first
      for (let i = L - n - 1; i >= 0; i--) {
        let j = 0;
        while (j < n && h[i + j] === h[L - n + j]) j++;
        if (j === n) return h.slice(i + n, i + n + k);
      }
    }
    return [];
  }
}

/** `speculate` option -> a drafter: "ngram" (a draft model runs natively only). */
export function drafterFor(spec, k = DRAFT_K) {
  if (spec === "ngram") return new NgramDrafter(k);
  throw new InvalidParameterError(`speculate: the browser runtime drafts by prompt lookup only ("ngram"; got ` +
    `${JSON.stringify(spec)}); a draft model runs natively: \`kiln run --speculate MODEL\``, "speculate");
}

/** The target's side of a pass: choose tokens from rows of logits, keep drafts by the rule above. */
export class Verifier {
  constructor(sampler, matcher) { Object.assign(this, {sampler, matcher}); }

  async _mask() { return this.matcher !== null ? this.matcher.mask() : null; }

  /** One token from one row (null: the grammar allows nothing). */
  async choose(logits, history) {
    const mask = await this._mask();
    if (this.matcher !== null && mask === null) return null;
    return this.sampler.sample(logits, history, mask);
  }

  /** [kept, token]: kept true -> d is taken; else token is the replacement drawn (null: grammar dead end). */
  async accepts(logits, history, d) {
    const mask = await this._mask();
    if (this.matcher !== null && mask === null) return [false, null];
    const [order, w] = this.sampler.candidates(logits, history, mask);
    if (w === null) return order[0] === d ? [true, d] : [false, order[0]];   // greedy
    let total = 0;
    for (const x of w) total += x;
    const hit = order.indexOf(d);
    const pd = hit >= 0 ? w[hit] / total : 0;
    if (pd > 0 && this.sampler.rng.next() < pd) return [true, d];
    const r0 = Float64Array.from(w);
    if (hit >= 0) r0[hit] = 0;                                   // the residual: p without d, renormalised
    let sum = 0;
    const cdf = r0.map((x) => (sum += x));
    if (!(sum > 0)) return [true, d];                            // p was all on d (then it was kept above)
    const r = this.sampler.rng.next() * sum;
    let i = 0;
    while (i < cdf.length && cdf[i] <= r) i++;                   // searchsorted(cdf, r, "right")
    return [false, order[Math.min(i, order.length - 1)]];
  }
}

/**
 * Yields [id, logits row | null] for each generated id (generateSpeculative feeds them to its stop / EOS / grammar
 * checks and returns us when it is done). `history` is the caller's array: it grows as ids are yielded. The prompt
 * is already forwarded.
 */
export async function* speculativeTokens(session, history, sampler, matcher, drafter, maxTokens, stats, wantLogits,
                                         scoreChunk) {
  const v = new Verifier(sampler, matcher), p = sampler.p;
  const fast = p.greedy && matcher === null && !wantLogits && p.repeat_penalty === 1 && !p.presence_penalty &&
    !p.frequency_penalty;                                            // plain steps: GPU argmax, 4 bytes read
  const plain = async () => {
    if (fast) return [await session.nextToken(), null];
    const row = await session.logits();
    return [await v.choose(row, history), row];
  };
  const cost = PASS_COST[session.model?.adapterClass] || PASS_COST.gpu;
  const length = drafter.adaptive ? new DraftLength(drafter.k, cost) : null;

  let [tok, row] = await plain();                                    // from the prompt's last position
  let n = 0;
  while (tok !== null) {
    yield [tok, row];                                                // the caller appends it to history
    n++;
    const room = maxTokens - n;
    if (room <= 0) return;
    const k = Math.min(length ? length.k() : drafter.k, room - 1, scoreChunk - 1);
    const drafts = k > 0 ? drafter.draft(history, k) : [];
    const guess = length && k === 0 ? drafter.draft(history, 1) : [];   // checked against the plain step's token
    stats.passes++;
    if (!drafts.length) {                                            // a plain decode step
      session.forward([tok]);
      [tok, row] = await plain();
      if (guess.length) length.probe(guess[0] === tok);
      continue;
    }
    stats.draft_tokens += drafts.length;
    const base = session.pos;
    const rows = (await session.scoreChunks([tok, ...drafts]).next()).value;   // (1 + drafts, vocab)
    let kept = 0, allKept = true;
    for (let i = 0; i < drafts.length; i++) {
      const [ok, t] = await v.accepts(rows[i], history, drafts[i]);
      tok = t;
      row = rows[i];
      if (!ok) { allKept = false; break; }
      kept++;
      stats.accepted_tokens++;
      yield [drafts[i], row];
      n++;
      if (n >= maxTokens) return;
    }
    if (allKept) {
      row = rows[drafts.length];
      tok = await v.choose(row, history);                            // every draft kept: one more from the last row
    }
    if (length) length.update(drafts.length, kept);
    session.reset(base + 1 + kept);                                  // [pending] + the kept drafts stay in the cache
  }
}

const now = () => performance.now() / 1000;
const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;

/** generate()'s loop with speculation (generate.js hands it over); same events, same finish reasons, timings +
 *  acceptance. */
export async function* generateSpeculative(session, tokenizer, promptIds, params, drafter, {maxTokens, logprobs,
                                                                                             eogIds, shouldStop,
                                                                                             reuse = true}) {
  const {StopStrings} = await import("./generate.js");
  const sampler = new Sampler(params);
  const constraint = await constraintFor(params, tokenizer);
  const matcher = constraint !== null ? await constraint.matcher() : null;
  const decoder = tokenizer.streamDecoder(), stops = new StopStrings(params.stop);
  const history = [...promptIds], outIds = [], text = [];
  const eog = new Set(eogIds);
  const stats = {draft_tokens: 0, accepted_tokens: 0, passes: 0};

  const t0 = now();
  let cached = 0;
  if (reuse) cached = reusePrefix(session, promptIds);
  else session.reset();
  session.forward(promptIds.slice(cached));
  let tFirst = null, finish = FINISH_GRAMMAR, cut = false, ended = false;   // the source ends only on a dead end
  const source = speculativeTokens(session, history, sampler, matcher, drafter, maxTokens, stats, Boolean(logprobs),
                                   session.model.manifest.limits.score_chunk);
  for await (const [tok, row] of source) {
    if (tFirst === null) tFirst = now();
    if (eog.has(tok)) { finish = "stop"; ended = true; break; }
    if (matcher !== null) matcher.consume(tok);
    outIds.push(tok);
    history.push(tok);
    let delta;
    [delta, cut] = stops.feed(decoder.push(tok));
    text.push(delta);
    yield {type: "token", id: tok, text: delta, top_logprobs: logprobs ? topLogprobs(row, logprobs) : null};
    if (cut || shouldStop() || (matcher !== null && await matcher.done())) { finish = "stop"; ended = true; break; }
    if (outIds.length >= maxTokens) { finish = "length"; ended = true; break; }
  }
  if (!ended && outIds.length >= maxTokens) finish = "length";
  await source.return();
  if (!cut) {
    let tail;
    [tail, cut] = stops.feed(decoder.flush());
    tail += cut ? "" : stops.flush();
    if (cut) finish = "stop";
    if (tail) {
      text.push(tail);
      yield {type: "token", id: -1, text: tail, top_logprobs: null};
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
    speculate: drafter.name, ...stats,
    acceptance_rate: stats.draft_tokens ? round(stats.accepted_tokens / stats.draft_tokens, 4) : null,
  };
  yield {type: "done", ids: outIds, text: text.join(""), finish_reason: finish, timings};
}
