"""Every BPE pre-tokenizer name kiln maps (compiler/tokenizer.py BPE_PRE_TYPES: llama-bpe, qwen2, smollm, gpt-2, ...)
splits text exactly as llama.cpp does: the ids of kiln's tokenizer.json equal llama.cpp's on texts that tell the
regexes apart (tests/fixtures/archs/pretokenizers.json, made by tools/arch_fixtures/pretokenizer_refs.py with the test
models' BPE vocabulary and `tokenizer.ggml.pre` replaced by each name)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from compiler.tokenizer import BPE_PRE_TYPES, build_tokenizer_json, tokenizer_info
from runtime_py.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "archs"
REF = json.loads((ROOT / "pretokenizers.json").read_text())


class _Field:
    def __init__(self, v):
        self.v = v

    def contents(self):
        return self.v


class _WithPre:
    """A GGUFReader whose tokenizer.ggml.pre reads `pre` (the tokenizer stage reads only `fields`)."""
    def __init__(self, reader: gguf.GGUFReader, pre: str):
        self.fields = {**reader.fields, "tokenizer.ggml.pre": _Field(pre)}


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(str(ROOT / REF["source"]))


def test_every_mapped_name_has_references():
    assert set(REF["ids"]) == set(BPE_PRE_TYPES)


@pytest.mark.parametrize("pre", sorted(BPE_PRE_TYPES))
def test_ids_equal_llama_cpp(reader, pre):
    r = _WithPre(reader, pre)
    tok = Tokenizer(build_tokenizer_json(r), tokenizer_info(r))
    for text, want in zip(REF["texts"], REF["ids"][pre]):
        assert tok.encode(text, add_special_bos=False, parse_special=False) == want, repr(text)


def test_the_texts_tell_the_pre_tokenizers_apart():
    # otherwise the test above could not catch a wrong mapping between these families. With this vocabulary (no
    # multi-digit tokens) digit grouping does not show in the ids: smollm = gpt-2 and llama-bpe = qwen2 here; the
    # two families still differ (contractions in capitals, letters after punctuation, newlines)
    assert REF["ids"]["smollm"] == REF["ids"]["gpt-2"] and REF["ids"]["llama-bpe"] == REF["ids"]["qwen2"]
    assert REF["ids"]["smollm"] != REF["ids"]["llama-bpe"]
