// Text <-> token ids in the browser: @huggingface/tokenizers over the artifact's tokenizer.json (the same file
// runtime_py/tokenizer.py loads), plus the manifest's tokenizer info, with llama.cpp's encode semantics.
// Mirrors runtime_py/tokenizer.py.
//
//   const tok = await Tokenizer.load(lib, baseUrl + "tokenizer.json", manifest.tokenizer);
//   const ids = tok.encode(prompt);          // BOS per info.add_bos, control tokens in the text parsed
//   const ids = tok.encode(prompt, null, {plainSpans: [[0, 5]]});   // ... except in these ranges (chat contents)
//   const stream = tok.streamDecoder();
//   for (const id of generated) out += stream.push(id);
//   out += stream.flush();
//
// `lib` is the imported "@huggingface/tokenizers" module: the worker imports it by the URL the page's import map
// resolves to (import maps don't reach into workers), see api.js.
// parseSpecial=false (control tokens as plain text): tokenizers.js has no switch for it (Python's
// `encode_special_tokens`), so a second instance is built from the same file without its special added tokens:
// their texts then go through the normalizer and BPE like any text, which is what the switch does.

export const REPLACEMENT_CHAR = "\ufffd";

export class Tokenizer {
  constructor(lib, tokenizerJson, info) {
    // clean_up_tokenization_spaces defaults to true in tokenizers.js (" ." -> "."); llama.cpp and the Python
    // `tokenizers` decode don't do that, so it is turned off.
    this._lib = lib;
    this._json = tokenizerJson;
    this._tok = new lib.Tokenizer(tokenizerJson, {clean_up_tokenization_spaces: false});
    this._tokNoSpecial = null;   // built on first parseSpecial=false use; see _plain()
    this._special = null;        // see _specials()
    this.info = {...info};
    this.bos_id = info.bos_id ?? null;
    this.eos_id = info.eos_id ?? null;
    this.add_bos = Boolean(info.add_bos);
    this.eog_ids = new Set(info.eog_ids || (this.eos_id !== null ? [this.eos_id] : []));
  }

  static async load(lib, url, info) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return new Tokenizer(lib, await r.json(), info);
  }

  _plain() {
    this._tokNoSpecial ??= new this._lib.Tokenizer(
      {...this._json, added_tokens: this._json.added_tokens.filter((t) => !t.special)},
      {clean_up_tokenization_spaces: false});
    return this._tokNoSpecial;
  }

  /** [special token text -> id, their lengths longest first, their first characters]; built on first use. */
  _specials() {
    if (!this._special) {
      const table = new Map(this._json.added_tokens.filter((t) => t.special).map((t) => [t.content, t.id]));
      const lengths = [...new Set([...table.keys()].map((t) => t.length))].sort((a, b) => b - a);
      this._special = [table, lengths, new Set([...table.keys()].map((t) => t[0]))];
    }
    return this._special;
  }

  /** [[start, end, id]] of the special (control) tokens in `text`, leftmost-longest as the tokenizer cuts them. */
  findSpecial(text) {
    const [table, lengths, firsts] = this._specials();
    const out = [];
    for (let i = 0; i < text.length;) {
      if (firsts.has(text[i])) {
        const hit = lengths.find((L) => i + L <= text.length && table.has(text.slice(i, i + L)));
        if (hit) { out.push([i, i + hit, table.get(text.slice(i, i + hit))]); i += hit; continue; }
      }
      i++;
    }
    return out;
  }

  /** llama.cpp's tokenize(text, add_special, parse_special); runtime_py.tokenizer.Tokenizer.encode.
   *  addSpecialBos: null = the model's add_bos. plainSpans: [[start, end]] ranges (chat message contents) in which
   *  control tokens are not parsed. */
  encode(text, addSpecialBos = null, {parseSpecial = true, plainSpans = null} = {}) {
    const tok = parseSpecial ? this._tok : this._plain();
    const found = parseSpecial && plainSpans && plainSpans.length ? this.findSpecial(text) : [];
    const kept = found.filter(([a, b]) => !plainSpans.some(([s, e]) => s < b && a < e));
    let ids;
    if (kept.length === found.length) {
      ids = tok.encode(text, {add_special_tokens: false}).ids;
    } else {
      ids = [];
      let pos = 0;
      for (const [start, end, id] of [...kept, [text.length, text.length, null]]) {
        if (start > pos) ids.push(...this._plain().encode(text.slice(pos, start), {add_special_tokens: false}).ids);
        if (id !== null) ids.push(id);
        pos = end;
      }
    }
    if (addSpecialBos === null) addSpecialBos = this.add_bos;
    if (addSpecialBos && this.bos_id !== null && !(ids.length && ids[0] === this.bos_id)) ids = [this.bos_id, ...ids];
    return ids;
  }

  /** Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. skipSpecial drops control tokens. */
  decode(ids, skipSpecial = false) {
    if (!ids.length) return "";
    return this._tok.decode(Array.from(ids), {skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: false});
  }

  isEog(id) { return this.eog_ids.has(id); }

  streamDecoder(skipSpecial = false) { return new StreamDecoder(this, skipSpecial); }
}

/** Incremental detokenizer: push ids one at a time, get text deltas that are always complete characters.
 *  Same algorithm as runtime_py.tokenizer.StreamDecoder (see its docstring): the tail is held back while the decoded
 *  window ends in U+FFFD; only the ids of the last emitted delta are kept as context. */
export class StreamDecoder {
  constructor(tokenizer, skipSpecial = false) {
    this._tok = tokenizer;
    this._skip = skipSpecial;
    this._ids = [];
    this._read = 0;   // ids[:_read] are already emitted (kept as decoding context)
  }

  _decode(ids) { return this._tok.decode(ids, this._skip); }

  push(id) {
    this._ids.push(id);
    const prefix = this._decode(this._ids.slice(0, this._read));
    const full = this._decode(this._ids);
    if (full.length > prefix.length && !full.endsWith(REPLACEMENT_CHAR)) {
      const delta = full.slice(prefix.length);
      this._ids = this._ids.slice(this._read);
      this._read = this._ids.length;
      return delta;
    }
    return "";
  }

  flush() {
    const prefix = this._decode(this._ids.slice(0, this._read));
    const full = this._decode(this._ids);
    this._ids = [];
    this._read = 0;
    return full.length > prefix.length ? full.slice(prefix.length) : "";
  }
}
