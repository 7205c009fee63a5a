"""llama.cpp's token ids for every BPE pre-tokenizer kiln maps (compiler/tokenizer.py BPE_PRE_TYPES), on texts that
tell the regexes apart (digit runs, contractions in both cases, newlines and runs of spaces, punctuation, accents, CJK,
emoji), with the test models' BPE vocabulary (tests/fixtures/archs/qwen3, SmolLM2's first 1024 tokens) and its
`tokenizer.ggml.pre` replaced by each name. Writes tests/fixtures/archs/pretokenizers.json, which
tests/unit/test_pretokenizers.py compares kiln's tokenizer.json against (llama.cpp is needed only to regenerate).

    python tools/arch_fixtures/pretokenizer_refs.py        # kiln's venv: gguf + llama-cpp-python
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import gguf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from compiler.tokenizer import BPE_PRE_TYPES  # noqa: E402

SOURCE = "qwen3/qwen3-F16.gguf"
OUT = REPO / "tests/fixtures/archs/pretokenizers.json"
TEXTS = [
    "The capital of France is Paris.",
    "1 12 123 1234 12345 3.14159 2024-12-01 $1,000,000",
    "I'm sure you'LL see it's THEIR car, isn't it? We'd've gone.",
    "line one\nline two\n\n\nindented:\n    four spaces\n\ttab\r\nwindows",
    "   leading spaces, trailing spaces   ",
    "def f(x):\n    return x**2 + 1  # comment!!\n",
    "café naïve résumé — Übergrößen façade",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 😀👍🏽 and symbols ©®™ ±×÷ ≤≥",
    "Mixed123abc ABC123 x1y2z3 ...!!!??? ((()))",
]


def with_pre(src: Path, dst: Path, pre: str):
    """A copy of the GGUF `src` (metadata and tensors) whose tokenizer.ggml.pre is `pre`."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=None)
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        v = pre if key == "tokenizer.ggml.pre" else f.contents()
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, v, t, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, t)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=[int(x) for x in reversed(t.shape)], raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    import llama_cpp
    out = {"source": SOURCE, "llama_cpp_python": llama_cpp.__version__, "texts": TEXTS, "ids": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in sorted(BPE_PRE_TYPES):
            path = Path(tmp) / f"{pre}.gguf"
            with_pre(REPO / "tests/fixtures/archs" / SOURCE, path, pre)
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            out["ids"][pre] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS]
            print(pre, [len(i) for i in out["ids"][pre]])
            del llm
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=0))


if __name__ == "__main__":
    main()
