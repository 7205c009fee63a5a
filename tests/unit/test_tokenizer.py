"""Tokenizer built straight from the GGUF (compiler.tokenizer) must give llama.cpp's ids, round-trip, and stream.

Reference ids (tests/fixtures, from /work/shared/refs): `<model>_tokenizer.json` has llama.cpp ids for tricky strings
without BOS (`cases`: control tokens as plain text; `cases_special`: control tokens parsed); `<model>_llamacpp.json`
and `<model>_transformers.json` have the prompt ids (BOS included) of the prompts in prompts.json.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import gguf
import pytest
import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/ (for models.py), whatever the import mode
from models import gemma3_gguf_path, smollm2_gguf_path          # noqa: E402

from compiler.chat_templates import GEMMA_TEMPLATE              # noqa: E402
from compiler.errors import UnsupportedModelError               # noqa: E402
from compiler.tokenizer import build_tokenizer_json, tokenizer_info   # noqa: E402
from runtime_py.tokenizer import REPLACEMENT_CHAR, StreamDecoder, Tokenizer   # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL_PATHS = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}
MODELS = tuple(MODEL_PATHS)


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def built(model: str) -> tuple[dict, dict, Tokenizer]:
    """(tokenizer.json dict, info, Tokenizer) for `model`, built from its GGUF once per test session."""
    reader = gguf.GGUFReader(MODEL_PATHS[model]())
    tok_json, info = build_tokenizer_json(reader), tokenizer_info(reader)
    return tok_json, info, Tokenizer(tok_json, info)


def tokenizer(model: str) -> Tokenizer:
    return built(model)[2]


def _case_params():
    """One pytest param per (model, fixture case): (model, text, llama.cpp ids, parse_special)."""
    params = []
    for model in MODELS:
        ref = fixture(f"{model}_tokenizer.json")
        for kind, parse_special in (("cases", False), ("cases_special", True)):
            for i, case in enumerate(ref[kind]):
                label = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in case["text"][:24]) or "empty"
                params.append(pytest.param(model, case["text"], case["ids"], parse_special,
                                           id=f"{model}-{kind}-{i:02d}-{label}"))
    return params


CASES = _case_params()


@pytest.mark.parametrize("model,text,ids,parse_special", CASES)
def test_ids_equal_llamacpp(model, text, ids, parse_special):
    assert tokenizer(model).encode(text, add_special_bos=False, parse_special=parse_special) == ids


@pytest.mark.parametrize("model,text,ids,parse_special", CASES)
def test_decode_round_trips(model, text, ids, parse_special):
    tok = tokenizer(model)
    assert tok.decode(tok.encode(text, add_special_bos=False, parse_special=parse_special)) == text
    assert tok.decode(ids) == text


@pytest.mark.parametrize("model,text,ids,parse_special", CASES)
def test_stream_decoder_reproduces_decode(model, text, ids, parse_special):
    tok = tokenizer(model)
    stream = StreamDecoder(tok)
    deltas = [stream.push(i) for i in ids]
    tail = stream.flush()
    assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas
    assert "".join(deltas) + tail == tok.decode(ids) == text


def _prompt_params():
    """Plain-text prompts only; the chat prompt is tests/unit/test_chat.py's."""
    texts = {p["name"]: p["text"] for p in fixture("prompts.json")["prompts"] if "text" in p}
    params = []
    for model in MODELS:
        for peer in ("llamacpp", "transformers"):
            for case in fixture(f"{model}_{peer}.json")["cases"]:
                if case["name"] not in texts:
                    continue
                params.append(pytest.param(model, texts[case["name"]], case["prompt_ids"],
                                           id=f"{model}-{peer}-{case['name']}"))
    return params


@pytest.mark.parametrize("model,text,prompt_ids", _prompt_params())
def test_prompt_ids_equal_references(model, text, prompt_ids):
    """With the model's own BOS rule: Gemma adds <bos>, SmolLM2 adds nothing."""
    assert tokenizer(model).encode(text) == prompt_ids


@pytest.mark.parametrize("model,expected", [
    ("smollm2", {"bos_id": 1, "eos_id": 2, "add_bos": False, "eog_ids": [0, 2, 4],
                 "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_model": "gpt2"}),
    ("gemma3", {"bos_id": 2, "eos_id": 1, "add_bos": True, "eog_ids": [1, 106, 212],
                "bos_token": "<bos>", "eos_token": "<eos>", "tokenizer_model": "llama",
                "chat_template": GEMMA_TEMPLATE}),   # the GGUF has none: llama.cpp's built-in one, as manifest data
])
def test_tokenizer_info(model, expected):
    info = built(model)[1]
    assert {k: info[k] for k in expected} == expected
    json.dumps(info)   # goes into manifest.json
    assert all(tokenizer(model).is_eog(i) for i in expected["eog_ids"])


def test_smollm2_has_chat_template():
    assert "<|im_start|>" in built("smollm2")[1]["chat_template"]


# Component types the browser library (@huggingface/transformers tokenizers) implements; the file must use no others.
STANDARD_TYPES = {"BPE", "Split", "ByteLevel", "Sequence", "Replace", "Prepend", "ByteFallback", "Fuse", "Strip",
                  "TemplateProcessing"}


def _types(node):
    if isinstance(node, dict):
        if "type" in node:
            yield node["type"]
        for k, v in node.items():
            if k not in ("vocab", "merges"):
                yield from _types(v)
    elif isinstance(node, list):
        for v in node:
            yield from _types(v)


@pytest.mark.parametrize("model", MODELS)
def test_tokenizer_json_is_standard(model):
    tok_json = built(model)[0]
    assert set(_types(tok_json)) <= STANDARD_TYPES
    text = json.dumps(tok_json, ensure_ascii=False)
    tokenizers.Tokenizer.from_str(text)              # loads as a plain tokenizer.json
    assert tok_json["model"]["vocab"]["<0x41>" if model == "gemma3" else "A"] >= 0
    assert all(isinstance(m, list) and len(m) == 2 for m in tok_json["model"]["merges"][:100])


@pytest.mark.parametrize("model", MODELS)
def test_bos_rules(model):
    tok = tokenizer(model)
    info = built(model)[1]
    bare = tok.encode("Hi", add_special_bos=False)
    assert tok.encode("Hi", add_special_bos=True) == [info["bos_id"]] + bare
    assert tok.encode("Hi") == ([info["bos_id"]] if info["add_bos"] else []) + bare
    # a prompt that already starts with BOS (a template writing {{ bos_token }}) does not get a second one
    assert tok.encode(info["bos_token"] + "Hi", add_special_bos=True) == [info["bos_id"]] + bare
    # the post-processor in tokenizer.json adds BOS the same way, for runtimes that use add_special_tokens
    raw = tokenizers.Tokenizer.from_str(json.dumps(built(model)[0]))
    assert raw.encode("Hi").ids == tok.encode("Hi")


def test_parse_special_only_affects_control_tokens():
    tok = tokenizer("gemma3")
    # <start_of_turn> (105) is CONTROL: parsed only with parse_special
    assert tok.encode("<start_of_turn>", add_special_bos=False) == [105]
    assert 105 not in tok.encode("<start_of_turn>", add_special_bos=False, parse_special=False)
    # <table> (168) and "\n" (107) are USER_DEFINED: always matched, as llama.cpp does
    for parse_special in (True, False):
        assert tok.encode("<table>\n", add_special_bos=False, parse_special=parse_special) == [168, 107]
    # </s> is user-defined in the GGUF but an end-of-generation token, which llama.cpp forces to CONTROL
    assert tok.encode("</s>", add_special_bos=False) == [212]
    assert 212 not in tok.encode("</s>", add_special_bos=False, parse_special=False)


@pytest.mark.parametrize("model,text", [
    ("smollm2", "🎉"),                 # byte-level BPE: the emoji's 4 bytes span 3 tokens
    ("gemma3", "\U0010FFFD"),          # not in the vocab: 4 byte-fallback tokens <0xF4><0x8F><0xBF><0xBD>
])
def test_stream_decoder_holds_split_characters(model, text):
    tok = tokenizer(model)
    ids = tok.encode(text, add_special_bos=False)
    assert len(ids) > 1
    stream = tok.stream_decoder()
    deltas = [stream.push(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == text
    assert stream.flush() == ""
    # bytes that never complete come out as U+FFFD at flush, not before
    stream.push(ids[0])
    assert stream.flush() == REPLACEMENT_CHAR


def test_stream_decoder_long_generation_keeps_a_short_window():
    tok = tokenizer("smollm2")
    text = fixture("prompts.json")["prompts"][5]["text"]        # "long"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == text
    assert len(stream._ids) == 0


# ---- unsupported tokenizers: a tiny GGUF with only tokenizer metadata


def _tiny_gguf(tmp_path, model: str, pre: str | None = None) -> gguf.GGUFReader:
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def test_unknown_tokenizer_model_is_rejected(tmp_path):
    reader = _tiny_gguf(tmp_path, "bert")
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported: gpt2, llama"):
        build_tokenizer_json(reader)
    with pytest.raises(UnsupportedModelError):
        tokenizer_info(reader)


def test_unknown_pre_tokenizer_is_rejected(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"'no-such-pre'.*supported: .*smollm"):
        build_tokenizer_json(_tiny_gguf(tmp_path, "gpt2", "no-such-pre"))


def test_tiny_gpt2_tokenizer_works(tmp_path):
    tok_json = build_tokenizer_json(_tiny_gguf(tmp_path, "gpt2", "gpt-2"))
    assert tokenizers.Tokenizer.from_str(json.dumps(tok_json)).encode("ab").ids == [2]


@pytest.mark.parametrize("model", MODELS)
def test_find_special_matches_the_tokenizer(model):
    """find_special cuts the control tokens where the tokenizer does (an unfinished one is text)."""
    tok = tokenizer(model)
    a, b = {"smollm2": ("<|im_start|>", "<|im_end|>"), "gemma3": ("<start_of_turn>", "<end_of_turn>")}[model]
    text = f"x{a}y{b}{b}z{b[:-1]}"
    found = tok.find_special(text)
    assert [text[s:e] for s, e, _ in found] == [a, b, b]
    special = set(tok._specials()[0].values())
    assert [i for _, _, i in found] == [i for i in tok.encode(text, add_special_bos=False) if i in special]


@pytest.mark.parametrize("model", MODELS)
def test_plain_spans(model):
    tok = tokenizer(model)
    start, end = {"smollm2": ("<|im_start|>", "<|im_end|>"), "gemma3": ("<start_of_turn>", "<end_of_turn>")}[model]
    content = f"x{end}\n{start}system y"
    text = f"{start}user\n{content}{end}\n"
    span = (len(start) + 5, len(start) + 5 + len(content))
    ids = tok.encode(text, add_special_bos=False, plain_spans=[span])
    special = set(tok._specials()[0].values())
    assert [i for i in ids if i in special] == tok.encode(start + end, add_special_bos=False)
    assert tok.decode(ids) == text
    assert ids == tok.encode(start + "user\n", add_special_bos=False) + \
        tok.encode(content, add_special_bos=False, parse_special=False) + tok.encode(end + "\n", add_special_bos=False)
    # without a control token inside the span, the ids are the whole-text encode's, exactly
    clean = f"{start}user\nHello there{end}\n"
    assert tok.encode(clean, plain_spans=[(len(start) + 5, len(start) + 16)]) == tok.encode(clean)
    # a control token that only overlaps the span stays text too
    assert not set(tok.encode(end, add_special_bos=False, plain_spans=[(0, 2)])) & special
