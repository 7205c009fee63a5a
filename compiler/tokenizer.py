"""Tokenizer stage — GGUF tokenizer metadata -> a standard HuggingFace `tokenizer.json` + a small info dict.

The goal is *llama.cpp's* token ids (the model was converted for it, and the reference fixtures come from it), expressed
only with standard `tokenizers` components so that both the Python `tokenizers` package and the browser library
(`@huggingface/transformers` / `@huggingface/tokenizers`) load the same file unchanged.

How llama.cpp tokenizes (src/llama-vocab.cpp), and the component that reproduces each step:

  1. special-token partition: every CONTROL / USER_DEFINED / UNKNOWN token is cut out of the raw text first, longest
     text first; CONTROL and UNKNOWN only when `parse_special` is on, USER_DEFINED always.
       -> `added_tokens` (normalized=false, so they match raw text): CONTROL/UNKNOWN with special=true,
          USER_DEFINED with special=false. `parse_special=False` maps to `tokenizers`' `encode_special_tokens=True`,
          which stops matching *special* added tokens only — the same split llama.cpp makes.
  2a. gpt2 model (byte-level BPE): regex pre-split chosen by `tokenizer.ggml.pre`, bytes -> unicode map, ranked merges.
       -> Split(regex, Isolated) per llama.cpp regex, ByteLevel(use_regex=false), BPE with the GGUF merges in order.
  2b. llama model (SentencePiece, e.g. Gemma): ' ' -> '▁' (plus a leading '▁' if add_space_prefix), then *score-based*
      bigram merging over UTF-8 characters (highest score of the merged piece first, leftmost on ties), unknown
      characters as `<0xXX>` byte tokens.
       -> Replace(' ', '▁') normalizer, BPE with byte_fallback whose merges are every (left, right) split of every
          normal token with both halves in the vocab, ranked by the merged token's score (descending). With distinct
          scores (true for Gemma 3: score = -index for normal tokens) BPE's "lowest rank, then leftmost" order is
          exactly llama.cpp's "highest score, then leftmost" order.
  3. BOS: llama.cpp prepends BOS when `add_bos` -> TemplateProcessing post-processor (only when add_bos).

Known, deliberate gaps (none is hit by the two supported models' fixtures):
  * overlapping special tokens: llama.cpp cuts the longest token first over the whole text, `tokenizers` matches
    leftmost-longest; they differ only when two special tokens' texts overlap in the input.
  * per-model LSTRIP/RSTRIP attributes (phi-3, jina) are not modelled; those tokenizers are not supported anyway.

This module must not import wgpu: the compiler runs on machines without a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gguf

from .chat_templates import fallback_template
from .errors import GGUFError, UnsupportedModelError
from .gguf_file import quote

# GGUF token types (gguf.TokenType / llama.cpp llama_token_type).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# ---- pre-tokenizer regexes, copied from llama.cpp's llm_tokenizer_bpe (applied in order, each one splitting the
# pieces the previous produced: the same semantics as a `Sequence` of `Split(..., "Isolated")`).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreType:
    regexes: tuple[str, ...]
    ignore_merges: bool = False   # llama.cpp: a pre-split word that is itself a token is emitted whole


_STARCODER = _PreType((r"\p{N}", _GPT2_RE))     # smollm: digits split one by one, then the gpt2 regex
_GPT2 = _PreType((_GPT2_RE,))
_LLAMA3 = _PreType((_LLAMA3_RE,), ignore_merges=True)
_QWEN2 = _PreType((_QWEN2_RE,))

# `tokenizer.ggml.pre` value -> pre-tokenizer, following llama.cpp's name -> LLAMA_VOCAB_PRE_TYPE_* mapping.
# Verified against llama.cpp token ids for every name here (tests/unit/test_pretokenizers.py: the archs test models'
# vocabulary with each name; tests/gpu/test_archs.py: smollm on real prompts).
BPE_PRE_TYPES: dict[str, _PreType] = {
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _STARCODER),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais"], _GPT2),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _PreType((_LLAMA3_RE,))),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], _QWEN2),
}
SUPPORTED_MODELS = ("gpt2", "llama")

# Token texts llama.cpp treats as end-of-generation (llama_vocab::impl::load, "auto-detect special tokens by text"),
# and FIM repo/pad/sep tokens, which it also adds to the EOG set. All of them are forced to CONTROL.
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
])
_FIM_EOG_TEXTS = frozenset([
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",                         # FIM_PAD
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",             # FIM_REP
    "<|file_sep|>",                                                                    # FIM_SEP
])
_FIM_OTHER_TEXTS = frozenset([   # FIM prefix/suffix/middle: forced to CONTROL but not EOG
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
])


# ---- every `tokenizer.*` key is read below, known to be irrelevant, or refused by name (config.unsupported) --------
TOKENIZER_KEYS = frozenset("tokenizer." + k for k in (   # what read_meta reads
    "ggml.model", "ggml.pre", "ggml.tokens", "ggml.token_type", "ggml.scores", "ggml.merges", "ggml.bos_token_id",
    "ggml.eos_token_id", "ggml.unknown_token_id", "ggml.eot_token_id", "ggml.eom_token_id", "ggml.add_bos_token",
    "ggml.add_space_prefix", "chat_template"))
TOKENIZER_IRRELEVANT = {
    # kiln never pads: one sequence per session, no batching by padding (llama.cpp does not use it either)
    "tokenizer.ggml.padding_token_id": "padding id",
    # BERT-style specials: llama.cpp inserts them only for its WPM tokenizer or with add_sep_token, which is refused
    # below unless false; kiln's two tokenizer models (gpt2, llama) never emit them
    "tokenizer.ggml.seperator_token_id": "separator id",   # (gguf's spelling)
    "tokenizer.ggml.mask_token_id": "mask id",
    # the list of named chat templates (tokenizer.chat_template.<name>, e.g. tool_use): kiln renders the default one
    "tokenizer.chat_templates": "named chat templates",
}
TOKENIZER_IRRELEVANT_PREFIXES = ("tokenizer.chat_template.",)   # the named templates themselves (see above)
# keys whose value here is what kiln does anyway; any other value changes the token ids, so it is refused
TOKENIZER_HARMLESS = {
    "tokenizer.ggml.add_eos_token": (lambda v: v is False, "false: no EOS appended to a prompt"),
    "tokenizer.ggml.add_sep_token": (lambda v: v is False, "false: no SEP appended to a prompt"),
    # llama.cpp reads it for its UGM (T5) tokenizer only; refused when true all the same, to be safe
    "tokenizer.ggml.remove_extra_whitespaces": (lambda v: v is False, "false: whitespace kept as is"),
}


@dataclass
class TokenizerMeta:
    """The GGUF `tokenizer.*` keys this module uses, with llama.cpp's defaults filled in."""
    model: str                   # "gpt2" | "llama"
    pre: str                     # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]            # id -> token text (byte-level unicode for gpt2, '▁' for spaces for llama)
    types: list[int]             # id -> TT_* (NORMAL when the key is absent)
    scores: list[float] | None   # id -> score (SentencePiece merge priority); None when absent
    merges: list[str] | None     # "left right" in rank order (gpt2 only)
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None


def _get(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_meta(reader: gguf.GGUFReader) -> TokenizerMeta:
    model = _get(reader, "tokenizer.ggml.model")
    if not isinstance(model, str) or model not in SUPPORTED_MODELS:
        raise UnsupportedModelError(
            f"tokenizer model {quote(model)} is not supported (supported: {', '.join(SUPPORTED_MODELS)})")
    tokens = _get(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("the GGUF has no tokenizer.ggml.tokens")
    n = len(tokens)
    types = _get(reader, "tokenizer.ggml.token_type") or [TT_NORMAL] * n
    scores, merges = _get(reader, "tokenizer.ggml.scores"), _get(reader, "tokenizer.ggml.merges")
    # per-token arrays must cover the vocabulary exactly (zip would silently drop the tail), with values of their type
    for key, arr, kind in (("tokens", tokens, str), ("token_type", types, int), ("scores", scores, (int, float)),
                           ("merges", merges, str)):
        if arr is None:
            continue
        if not isinstance(arr, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in arr):
            raise GGUFError(f"corrupt tokenizer metadata: tokenizer.ggml.{key} is not an array of "
                            f"{'strings' if kind is str else 'numbers'}")
        if key in ("token_type", "scores") and len(arr) != n:
            raise GGUFError(f"corrupt tokenizer metadata: tokenizer.ggml.{key} has {len(arr)} entries for {n} tokens")
    if scores is not None and not all(math.isfinite(v) for v in scores):
        raise GGUFError("corrupt tokenizer metadata: tokenizer.ggml.scores holds a NaN or infinity")
    # llama.cpp's per-model defaults (llama_vocab::impl::load), overridden by the GGUF keys when present.
    spm = model == "llama"
    defaults = {"bos": 1, "eos": 2, "unk": 0} if spm else {"bos": 11, "eos": 11, "unk": None}

    def tid(name: str, default):
        v = _get(reader, f"tokenizer.ggml.{name}_token_id", default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise GGUFError(f"corrupt tokenizer metadata: tokenizer.ggml.{name}_token_id = {quote(v)}")
        return None if v is None or not (0 <= v < n) else v

    pre = _get(reader, "tokenizer.ggml.pre") or "default"
    template = _get(reader, "tokenizer.chat_template")
    for key, v in (("pre", pre), ("chat_template", template)):
        if v is not None and not isinstance(v, str):
            raise GGUFError(f"corrupt tokenizer metadata: tokenizer.{'ggml.' * (key == 'pre')}{key} is not a string")
    add_bos_default = spm or BPE_PRE_TYPES.get(pre) is _LLAMA3   # llama.cpp: SPM and llama3-style BPE add BOS
    return TokenizerMeta(
        model=model, pre=pre, tokens=list(tokens), types=[int(t) for t in types],
        scores=scores, merges=merges,
        bos_id=tid("bos", defaults["bos"]), eos_id=tid("eos", defaults["eos"]), unk_id=tid("unknown", defaults["unk"]),
        eot_id=tid("eot", None), eom_id=tid("eom", None),
        add_bos=bool(_get(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
        add_space_prefix=bool(_get(reader, "tokenizer.ggml.add_space_prefix", spm)),
        chat_template=template,
    )


def _special_sets(meta: TokenizerMeta) -> tuple[set[int], list[int]]:
    """(ids llama.cpp treats as CONTROL, sorted end-of-generation ids), reproducing its text-based auto-detection."""
    control = {i for i, t in enumerate(meta.types) if t == TT_CONTROL}
    eog: set[int] = set()
    for i, text in enumerate(meta.tokens):
        if text in _EOG_TEXTS or text in _FIM_EOG_TEXTS:
            eog.add(i)
            control.add(i)
        elif text in _FIM_OTHER_TEXTS:
            control.add(i)
    for i in (meta.eos_id, meta.eot_id, meta.eom_id):
        if i is not None:
            eog.add(i)
    return control, sorted(eog)


def _added_tokens(meta: TokenizerMeta, control: set[int]) -> list[dict]:
    """Tokens cut out of the text before the model runs (llama.cpp's special-token cache)."""
    out = []
    for i, (text, tt) in enumerate(zip(meta.tokens, meta.types)):
        special = i in control or tt == TT_UNKNOWN
        if special or tt == TT_USER_DEFINED:
            out.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": special})
    return out


def _split_merge(m: str) -> list[str]:
    # llama.cpp splits at the first space after position 0 (a merge's left side may itself start with a space).
    pos = m.find(" ", 1)
    if pos < 0:
        raise UnsupportedModelError(f"malformed BPE merge {quote(m)} in tokenizer.ggml.merges")
    return [m[:pos], m[pos + 1:]]


def _spm_merges(meta: TokenizerMeta) -> list[list[str]]:
    """BPE merges equivalent to llama.cpp's score-ordered SentencePiece bigram merging.

    Only NORMAL tokens are merge results: USER_DEFINED/CONTROL texts are cut out of the text before merging, so a
    merge can never produce one (and byte tokens `<0xXX>` are produced only by fallback, never by merging).
    """
    if meta.scores is None:
        raise UnsupportedModelError("SentencePiece ('llama') tokenizer without tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(meta.tokens)}
    ranked = []   # (-score, merged id, left id, [left, right])
    for i, (text, tt) in enumerate(zip(meta.tokens, meta.types)):
        if tt != TT_NORMAL or len(text) < 2:
            continue
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in vocab and right in vocab:
                ranked.append((-meta.scores[i], i, vocab[left], [left, right]))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked]


def _bos_post_processor(meta: TokenizerMeta) -> dict | None:
    if not meta.add_bos or meta.bos_id is None:
        return None
    bos = meta.tokens[meta.bos_id]
    seq = lambda s: {"Sequence": {"id": s, "type_id": 0}}          # noqa: E731
    tok = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [tok, seq("A")], "pair": [tok, seq("A"), tok, seq("B")],
            "special_tokens": {bos: {"id": bos, "ids": [meta.bos_id], "tokens": [bos]}}}


def _gpt2_parts(meta: TokenizerMeta) -> dict:
    pre = BPE_PRE_TYPES.get(meta.pre)
    if pre is None:
        raise UnsupportedModelError(
            f"BPE pre-tokenizer {quote(meta.pre)} (tokenizer.ggml.pre) is not supported "
            f"(supported: {', '.join(sorted(BPE_PRE_TYPES))})")
    if not meta.merges:
        raise UnsupportedModelError("gpt2 tokenizer without tokenizer.ggml.merges")
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in pre.regexes]
    vocab = {t: i for i, t in enumerate(meta.tokens)}
    merges = [_split_merge(m) for m in meta.merges]
    for i, (left, right) in enumerate(merges):   # `tokenizers` refuses to load a merge outside the vocabulary
        for piece in (left, right, left + right):
            if piece not in vocab:
                raise GGUFError(f"corrupt tokenizer metadata: merge #{i} ({quote(left + ' ' + right)}) needs token "
                                f"{quote(piece)}, which is not in tokenizer.ggml.tokens")
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre.ignore_merges,
                  "vocab": vocab, "merges": merges},
    }


def _spm_parts(meta: TokenizerMeta) -> dict:
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    # add_space_prefix: llama.cpp prepends ' ' to every text fragment that follows a special token or starts the text,
    # which is what a normalizer does (it runs on each piece left between added tokens).
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]}
                  if meta.add_space_prefix else replace)
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if meta.add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = meta.tokens[meta.unk_id] if meta.unk_id is not None else None
    return {
        "normalizer": normalizer,
        "pre_tokenizer": None,      # llama.cpp merges over the whole fragment, spaces included
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(meta.tokens)},
                  "merges": _spm_merges(meta)},
    }


def build_tokenizer_json(reader: gguf.GGUFReader) -> dict:
    """The tokenizer.json dict (HF `tokenizers` format 1.0) reproducing llama.cpp's ids for this GGUF.

    Merges are written as [left, right] pairs (tokenizers >= 0.20, transformers.js >= 3): SentencePiece pieces may
    contain spaces-as-text, which the legacy "left right" string form cannot express.
    """
    meta = read_meta(reader)
    if len(set(meta.tokens)) != len(meta.tokens):
        raise UnsupportedModelError("the GGUF vocabulary has duplicate token texts")
    control, _ = _special_sets(meta)
    parts = _gpt2_parts(meta) if meta.model == "gpt2" else _spm_parts(meta)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(meta, control),
        "normalizer": parts["normalizer"],
        "pre_tokenizer": parts["pre_tokenizer"],
        "post_processor": _bos_post_processor(meta),
        "decoder": parts["decoder"],
        "model": parts["model"],
    }


def tokenizer_info(reader: gguf.GGUFReader) -> dict:
    """What a runtime needs besides tokenizer.json (JSON-serialisable; goes into the manifest):

    bos_id, eos_id: int | None; add_bos: bool (prepend BOS to a prompt, as llama.cpp does);
    eog_ids: sorted end-of-generation ids as llama.cpp computes them; bos_token, eos_token: their texts (chat
    templates use them); vocab_size; tokenizer_model ("gpt2" | "llama"); chat_template: str, the GGUF's own or,
    when it has none, llama.cpp's built-in one for the architecture (compiler/chat_templates.py).
    """
    meta = read_meta(reader)
    arch = _get(reader, "general.architecture")
    arch = arch if isinstance(arch, str) else None
    _, eog = _special_sets(meta)
    text = lambda i: meta.tokens[i] if i is not None else None     # noqa: E731
    return {
        "bos_id": meta.bos_id,
        "eos_id": meta.eos_id,
        "add_bos": meta.add_bos,
        "eog_ids": eog,
        "bos_token": text(meta.bos_id),
        "eos_token": text(meta.eos_id),
        "vocab_size": len(meta.tokens),
        "tokenizer_model": meta.model,
        "chat_template": meta.chat_template if meta.chat_template is not None else fallback_template(arch),
    }
