"""The two tokenizers the test models use, built locally (nothing downloaded):

- `smollm2_trimmed(gguf_path, n_vocab, out_dir)`: SmolLM2's byte-level BPE cut to its first `n_vocab` ids (the 17
  special tokens, the 235 byte symbols, then the first n_vocab - 252 merges: SmolLM2's merge i makes token 252 + i, so
  the cut is a consistent BPE). Same pre-tokenizer as SmolLM2 (digits split one by one, then the GPT-2 byte-level
  regex), which llama.cpp names `smollm`. Written as a Hugging Face tokenizer.json + tokenizer_config.json.
- `sentencepiece_gemma(text_files, n_vocab, out_dir)`: a SentencePiece BPE model with byte fallback trained on local
  text, laid out like Gemma's (<pad> 0, <eos> 1, <bos> 2, <unk> 3, then <start_of_turn> / <end_of_turn>), for the
  gemma2 converter, which needs a tokenizer.model.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes):
    """Write via a temporary file and rename: a run reading the folder in parallel never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)

SMOLLM_N_SPECIAL = 17      # <|endoftext|> ... <empty_output>
SMOLLM_FIRST_MERGE = 252   # id of the token merge 0 makes

# tokenizer.json pre_tokenizer of SmolLM2 (and of every trimmed copy): what llama.cpp's `smollm` pre-type splits like
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def smollm2_trimmed(gguf_path: Path, n_vocab: int, out_dir: Path) -> dict:
    import gguf
    r = gguf.GGUFReader(str(gguf_path))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    tokens, merges, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"), field("tokenizer.ggml.token_type")
    chat_template = field("tokenizer.chat_template")
    assert field("tokenizer.ggml.pre") == "smollm" and len(tokens) == 49152
    assert all(t == 3 for t in types[:SMOLLM_N_SPECIAL]) and all(t == 1 for t in types[SMOLLM_N_SPECIAL:])
    n_merges = n_vocab - SMOLLM_FIRST_MERGE
    kept = merges[:n_merges]
    for i, m in enumerate(kept):    # merge i yields token 252 + i: the cut keeps every merge's parts and result
        assert tokens[SMOLLM_FIRST_MERGE + i] == m.replace(" ", ""), (i, m)
    vocab = {t: i for i, t in enumerate(tokens[:n_vocab])}
    specials = tokens[:SMOLLM_N_SPECIAL]
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": SMOLLM_PRE_TOKENIZER,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in kept]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "tokenizer.json", json.dumps(tok_json, ensure_ascii=False))
    config = {
        # the generic fast tokenizer keeps tokenizer.json as written (a model-specific class may rebuild the split
        # regex: transformers 5's Qwen2Tokenizer does)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 8192, "chat_template": chat_template,
    }
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=1, ensure_ascii=False))
    write_atomic(out_dir / "special_tokens_map.json", json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=1))
    return {"kind": "smollm2-trimmed-bpe", "n_vocab": n_vocab, "source": gguf_path.name,
            "bos": "<|im_start|>", "eos": "<|im_end|>", "add_bos": False}


def sentencepiece_gemma(text_files: list[Path], n_vocab: int, out_dir: Path) -> dict:
    import sentencepiece as spm
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".spm."))
    corpus = tmp / "spm_corpus.txt"
    lines = []
    for f in text_files:
        lines += [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
    corpus.write_text("\n".join(lines) + "\n")
    prefix = tmp / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=n_vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        num_threads=1, minloglevel=2)
    os.replace(tmp / "tokenizer.model", out_dir / "tokenizer.model")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "chat_template": GEMMA2_CHAT_TEMPLATE,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        # as Gemma's own tokenizer_config: the converter types these CONTROL, so llama.cpp parses them as specials
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                        "<end_of_turn>"])},
    }
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=1))
    write_atomic(out_dir / "special_tokens_map.json", json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")},
        indent=1))
    return {"kind": "sentencepiece-bpe-byte-fallback", "n_vocab": n_vocab,
            "trained_on": [f.name for f in text_files], "bos": "<bos>", "eos": "<eos>", "add_bos": True}
