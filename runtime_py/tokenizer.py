"""Text <-> token ids for the native runtime: a `tokenizers.Tokenizer` over the artifact's tokenizer.json (written by
compiler/tokenizer.py) plus the manifest's tokenizer info, with llama.cpp's encode semantics.

    tok = Tokenizer("artifact/tokenizer.json", manifest["tokenizer"])
    ids = tok.encode(prompt)                 # BOS per info["add_bos"], control tokens in the text parsed
    ids = tok.encode(prompt, plain_spans=[(0, 5)])   # ... except in these character ranges (chat message contents)
    text = tok.decode(ids)
    stream = tok.stream_decoder()
    for id in generated: print(stream.push(id), end="")
    print(stream.flush())

info keys used: bos_id, add_bos, eog_ids (see compiler/tokenizer.py: tokenizer_info).
"""
from __future__ import annotations

import json
import os
import threading

import tokenizers

from compiler.errors import ArtifactError
from compiler.gguf_file import escape

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(self, tokenizer_json: str | os.PathLike | dict, info: dict):
        """tokenizer_json: path to tokenizer.json, or the dict itself (as built by compiler.tokenizer)."""
        if isinstance(tokenizer_json, dict):
            self._json = json.dumps(tokenizer_json, ensure_ascii=False)
        else:
            try:
                with open(tokenizer_json, encoding="utf-8") as f:
                    self._json = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ArtifactError(f"{tokenizer_json}: cannot read the tokenizer "
                                    f"({getattr(e, 'strerror', None) or type(e).__name__}); recompile the model") from None
        try:
            self._tok = tokenizers.Tokenizer.from_str(self._json)
        except Exception as e:   # noqa: BLE001 — tokenizers raises plain Exception on a malformed file
            raise ArtifactError(f"{tokenizer_json if not isinstance(tokenizer_json, dict) else 'tokenizer.json'}: "
                                f"corrupt tokenizer ({escape(e)}); recompile the model") from None
        self._tok_no_special = None      # built on first parse_special=False call; see _plain()
        self._special = None             # see _specials()
        self._lock = threading.Lock()
        self.info = dict(info)
        self.bos_id: int | None = info.get("bos_id")
        self.eos_id: int | None = info.get("eos_id")
        self.add_bos: bool = bool(info.get("add_bos", False))
        self.eog_ids: frozenset[int] = frozenset(info.get("eog_ids") or ([self.eos_id] if self.eos_id is not None else []))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _plain(self) -> tokenizers.Tokenizer:
        # `encode_special_tokens` is a per-instance switch; flipping it on the shared instance would race with
        # concurrent encodes (the server is threaded), so parse_special=False uses its own instance.
        with self._lock:
            if self._tok_no_special is None:
                tok = tokenizers.Tokenizer.from_str(self._json)
                tok.encode_special_tokens = True
                self._tok_no_special = tok
        return self._tok_no_special

    def _specials(self) -> tuple[dict[str, int], list[int], str]:
        """(special token text -> id, their lengths longest first, their first characters), built on first use."""
        if self._special is None:
            table = {t["content"]: t["id"] for t in json.loads(self._json)["added_tokens"] if t["special"]}
            self._special = (table, sorted({len(t) for t in table}, reverse=True), "".join({t[0] for t in table}))
        return self._special

    def find_special(self, text: str) -> list[tuple[int, int, int]]:
        """[(start, end, id)] of the special (control) tokens in `text`, leftmost-longest as the tokenizer cuts them."""
        table, lengths, firsts = self._specials()
        out, i, n = [], 0, len(text)
        while i < n:
            if text[i] in firsts:
                hit = next((L for L in lengths if i + L <= n and text[i:i + L] in table), 0)
                if hit:
                    out.append((i, i + hit, table[text[i:i + hit]]))
                    i += hit
                    continue
            i += 1
        return out

    def encode(self, text: str, add_special_bos: bool | None = None, parse_special: bool = True,
               plain_spans=()) -> list[int]:
        """llama.cpp's `tokenize(text, add_special, parse_special)`.

        add_special_bos: prepend BOS; None = the model's add_bos. A BOS is not added when the text already starts with
        one (a chat template that writes `{{ bos_token }}`), where llama.cpp would warn and send two.
        parse_special: control tokens written in the text (e.g. "<|im_start|>") become their ids; when False they are
        tokenized as plain text. User-defined tokens are always matched, as in llama.cpp.
        plain_spans: [(start, end)] character ranges (message contents) in which control tokens are not parsed even
        with parse_special: a control token overlapping one stays text. Without such a token the ids are exactly
        those of the whole-text encode; with one, the text is cut at the control tokens that are kept and each piece
        between them is encoded with special tokens off (the tokenizer cuts at control tokens anyway).
        """
        tok = self._tok if parse_special else self._plain()
        found = self.find_special(text) if parse_special and plain_spans else []
        kept = [f for f in found if not any(s < f[1] and f[0] < e for s, e in plain_spans)]
        if len(kept) == len(found):
            ids = tok.encode(text, add_special_tokens=False).ids
        else:
            ids, pos = [], 0
            for start, end, tid in kept + [(len(text), len(text), None)]:
                if start > pos:
                    ids += self._plain().encode(text[pos:start], add_special_tokens=False).ids
                if tid is not None:
                    ids.append(tid)
                pos = end
        if add_special_bos is None:
            add_special_bos = self.add_bos
        if add_special_bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. skip_special drops control tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry (as stored, e.g. 'Ġworld' or '▁world'), for debugging."""
        return self._tok.id_to_token(token_id)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get text deltas that are always complete characters.

    A token may end inside a UTF-8 sequence (byte-fallback `<0xF0>` tokens, or a byte-level BPE token holding half
    an emoji); decoding it alone gives U+FFFD. So the tail is held back while the decoded window ends in U+FFFD and
    released once the character completes. Concatenated deltas + flush() equal `decode(all ids)` for any stream of
    valid UTF-8, and U+FFFD is emitted only for bytes that stay invalid (at the latest, by flush()).

    Keeps only a short window of ids: the ids of the last emitted delta (`_ids[:_read]`, context for the decoder) and
    the not-yet-emitted ones (`_ids[_read:]`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._read = 0          # ids[:_read] are already emitted (kept as decoding context)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[:self._read])
        full = self._decode(self._ids)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix):]
            # the emitted ids become the context for the next delta; older ones are no longer needed
            self._ids = self._ids[self._read:]
            self._read = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back (incomplete bytes at the end of generation become U+FFFD). Resets the decoder."""
        prefix = self._decode(self._ids[:self._read])
        full = self._decode(self._ids)
        self._ids, self._read = [], 0
        return full[len(prefix):] if len(full) > len(prefix) else ""
