// Constrained decoding in the browser: a request's output constraint -> a token mask per step, by
// @mlc-ai/web-xgrammar (WebLLM's grammar engine, C++ in wasm). Mirrors runtime_py/grammar.py (llguidance there), same
// four kinds of constraint, same JSON options (compact: "," and ":" separators, no free whitespace; additional
// properties as the schema says) and the same finish reasons:
//
//   response_format {"type": "json_object"}                     any JSON object
//   response_format {"type": "json_schema", "json_schema": {"schema": {...}}}   JSON valid against the schema
//   grammar "<GBNF>"                                            llama.cpp's GBNF, which xgrammar reads as its EBNF
//   regex "<pattern>"                                           the whole output matches the pattern
//
//   useGrammarEngine(url)                      // the worker, at load: where the engine's module is (loaded on first use)
//   const c = await constraintFor(params, tokenizer)   // null without a constraint; InvalidParameterError if the
//   const m = await c.matcher()                         // engine rejects it; compiled once per (constraint, tokenizer)
//   const mask = await m.mask()                // Uint8Array (vocab,) of 0/1: allowed next; null: none is (the
//   m.consume(tok)                             // generation ends, finish_reason "grammar")
//   await m.done()                             // complete: nothing but end-of-generation may follow
//
// The masks equal llguidance's except where the grammar forces text: llguidance then allows only the canonical
// tokenization of the forced text (e.g. "answer" but not "a" for a forced "answer: "), xgrammar every tokenization.
// Same-seed outputs are equal on both sides where no forced text is split differently (tests/e2e/test_browser_structured.py).

import {InvalidParameterError} from "./errors.js";

export const CACHE_SIZE = 64;                 // compiled grammars kept, as grammar.py
export const FINISH_GRAMMAR = "grammar";
const SEPARATORS = [",", ":"];

let engineUrl = null, engine = null;
let heard = null;                             // while an engine call runs: what the engine printed (see engineCall)
const infos = new WeakMap();                  // Tokenizer -> GrammarCompiler (built once: the vocabulary's trie)
const compiled = new Map();                   // `${kind}\0${source}` -> CompiledGrammar, per compiler (LRU by insertion)

export function useGrammarEngine(url) { engineUrl = url; }

async function xgrammar() {
  if (!engine) {
    if (!engineUrl) throw new Error("no grammar engine configured (useGrammarEngine)");
    // the wasm runtime binds console.error when it loads and prints there why it aborts: route it through us first
    const print = console.error.bind(console);
    console.error = (...a) => (heard ? heard.push(a.join(" ")) : print(...a));
    await import(engineUrl);                  // a UMD bundle: as a module it defines globalThis.xgrammar
    engine = globalThis.xgrammar;
    if (!engine?.GrammarCompiler) throw new Error(`${engineUrl} did not define the xgrammar module`);
  }
  return engine;
}

/** [kind, source text, request field] of the constraint in `params`, or null; as grammar.py spec_of. */
export function specOf(params) {
  const rf = params.response_format;
  if (rf !== null && rf !== undefined && rf.type !== "text") {
    if (rf.type === "json_object") return ["json_object", "", "response_format"];
    return ["json_schema", JSON.stringify(rf.json_schema.schema), "response_format"];   // schema order kept
  }
  if (params.grammar !== null && params.grammar !== undefined) return ["grammar", params.grammar, "grammar"];
  if (params.regex !== null && params.regex !== undefined) return ["regex", params.regex, "regex"];
  return null;
}

/** xgrammar's view of the tokenizer: every token's text in id order (added tokens as "": xgrammar's mark of a
 *  special token, never allowed inside text, as llguidance treats them), the decoding kind of tokenizer.json. */
function vocabOf(json) {
  const m = json.model;
  const vocab = new Array(vocabSize(json)).fill("");
  if (Array.isArray(m.vocab)) m.vocab.forEach(([piece], i) => { vocab[i] = piece; });   // Unigram: [[piece, score]]
  else for (const [piece, i] of Object.entries(m.vocab)) vocab[i] = piece;
  for (const a of json.added_tokens || []) vocab[a.id] = "";
  const kinds = JSON.stringify(json.decoder ?? {});
  const type = kinds.includes("ByteLevel") ? "byte_level" : kinds.includes("ByteFallback") ? "byte_fallback" : "raw";
  const pre = JSON.stringify([json.normalizer ?? null, json.pre_tokenizer ?? null]);
  const prependSpace = pre.includes("\"Prepend\"") || /"prepend_scheme":"(first|always)"/.test(pre);
  return [vocab, type, prependSpace];
}

/** Tokens in tokenizer.json, added ones included (runtime_py/tokenizer.py `vocab_size`). */
export function vocabSize(json) {
  const m = json.model;
  let n = Array.isArray(m.vocab) ? m.vocab.length : Object.keys(m.vocab).length;
  for (const a of json.added_tokens || []) n = Math.max(n, a.id + 1);
  return n;
}

async function compilerFor(tokenizer) {
  let c = infos.get(tokenizer);
  if (!c) {
    const xgr = await xgrammar();
    const [vocab, type, prependSpace] = vocabOf(tokenizer._json);
    const info = await xgr.TokenizerInfo.createTokenizerInfo(vocab, type, prependSpace, vocab.length,
                                                             [...tokenizer.eog_ids].sort((a, b) => a - b));
    c = await xgr.GrammarCompiler.createGrammarCompiler(info);
    infos.set(tokenizer, c);
  }
  return c;
}

/** Runs an engine call; the engine aborts on a bad grammar and prints why to console.error: that text is the
 *  message of the InvalidParameterError (-> a 400 naming the field), as llguidance's is natively. */
async function engineCall(param, fn) {
  const said = heard = [];
  try {
    return await fn();
  } catch (e) {
    const why = said.map((s) => s.replace(/^\[FATAL\] \S+: /, "")).filter((s) => s && s !== "Aborted()").join("; ");
    throw new InvalidParameterError(`the grammar engine rejected it: ${why || e.message}`, param);
  } finally {
    heard = null;
  }
}

/** JSON Schema -> compiled grammar, compact. xgrammar 0.1.27 ignores the separators for its "any JSON value" rules
 *  (basic_object / basic_array: the contents of {"type": "object"} and untyped values) and writes ", " there; its
 *  EBNF is patched to "," so the grammar is llguidance's compact one (otherwise `","` is refused mid-object). */
async function compileJSON(xgr, comp, schema) {
  const g = await xgr.Grammar.fromJSONSchema(schema, false, -1, SEPARATORS, false);
  const ebnf = g.toString().replaceAll("(\", \" basic_", "(\",\" basic_");
  g.dispose();
  return comp.compileGrammar(ebnf);
}

export async function constraintFor(params, tokenizer) {
  const spec = specOf(params);
  if (spec === null) return null;
  const [kind, source, param] = spec;
  const comp = await compilerFor(tokenizer);
  const key = `${kind}\0${source}`;
  let byKey = compiled.get(comp);
  if (!byKey) compiled.set(comp, byKey = new Map());
  let g = byKey.get(key);
  if (g) {
    byKey.delete(key);                        // most recently used last
  } else {
    const xgr = await xgrammar();
    g = await engineCall(param, () => {
      if (kind === "json_object" || kind === "json_schema") return compileJSON(xgr, comp, source || "{\"type\": \"object\"}");
      if (kind === "regex") return comp.compileStructuralTag({type: "structural_tag", format: {type: "regex", pattern: source}});
      return comp.compileGrammar(source);
    });
    while (byKey.size >= CACHE_SIZE) {
      const [oldest, old] = byKey.entries().next().value;
      byKey.delete(oldest);
      old.dispose();
    }
  }
  byKey.set(key, g);
  return new Constraint(kind, source, param, g, tokenizer);
}

export class Constraint {
  constructor(kind, source, param, compiledGrammar, tokenizer) {
    Object.assign(this, {kind, source, param});
    this._g = compiledGrammar;
    this.vocab = vocabSize(tokenizer._json);
    this.eog = new Set(tokenizer.eog_ids);
  }

  async matcher() {
    const xgr = await xgrammar();
    return new Matcher(await xgr.GrammarMatcher.createGrammarMatcher(this._g), this.vocab, this.eog);
  }
}

export class Matcher {
  constructor(m, vocab, eog) {
    Object.assign(this, {m, vocab, eog});
    this._mask = undefined;                   // the next mask, computed once per step (done() needs it too)
  }

  /** Uint8Array (vocab,) of 0/1: the tokens allowed next; null when none is. */
  async mask() {
    if (this._mask === undefined) {
      const words = await this.m.getNextTokenBitmask();     // Int32Array, bit i of word i >> 5 = token i
      const out = new Uint8Array(this.vocab);
      let any = false;
      for (let i = 0; i < this.vocab; i++) {
        if ((words[i >>> 5] >>> (i & 31)) & 1) { out[i] = 1; any = true; }
      }
      this._mask = any ? out : null;
    }
    return this._mask;
  }

  consume(tok) {
    this._mask = undefined;
    return this.m.acceptToken(tok);
  }

  /** Complete: the grammar takes nothing but end-of-generation now (llguidance's is_stopped). */
  async done() {
    const mask = await this.mask();
    if (mask === null) return false;
    for (let i = 0; i < mask.length; i++) if (mask[i] && !this.eog.has(i)) return false;
    return true;
  }

  dispose() { this.m.dispose(); }
}

/** logits (n,) with every token the mask does not allow at -Infinity; ids past the mask (padding rows) too. */
export function applyMask(logits, mask) {
  const out = new Float64Array(logits.length).fill(-Infinity);
  const n = Math.min(mask.length, logits.length);
  for (let i = 0; i < n; i++) if (mask[i]) out[i] = logits[i];
  return out;
}
