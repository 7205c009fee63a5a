"""Run llama.cpp's own convert_hf_to_gguf.py, unchanged but for one lookup.

    python convert.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile OUT.gguf

The converter names a BPE pre-tokenizer by hashing the token ids of a fixed text, and only knows the hashes of
published tokenizers. Our trimmed SmolLM2 vocabulary (tokenizers_src.py) keeps SmolLM2's pre-tokenizer exactly but
has other ids, so its hash is new: when the converter does not recognise it and the folder's tokenizer.json splits
exactly like SmolLM2 (the same pre_tokenizer JSON), this answers "smollm" — what llama.cpp's
convert_hf_to_gguf_update.py would register for it. Anything else still fails as the converter does.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from tokenizers_src import SMOLLM_PRE_TOKENIZER


def main():
    lcpp = Path(sys.argv[1]).resolve()
    argv = sys.argv[2:]
    sys.path.insert(0, str(lcpp))
    sys.path.insert(1, str(lcpp / "gguf-py"))
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            # the tokenizer as loaded (a transformers class may have rebuilt the split), not just the file
            tj = json.loads(tokenizer.backend_tokenizer.to_str())
            if tj.get("pre_tokenizer") == SMOLLM_PRE_TOKENIZER and tj["model"]["type"] == "BPE":
                base.logger.info("pre-tokenizer: SmolLM2's split (trimmed vocabulary) -> smollm")
                return "smollm"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(lcpp / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(str(lcpp / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
