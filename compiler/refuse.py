"""Stage 2, second half — refuse what is not implemented (issue 12).

Every metadata key of a file is read by a reader (ARCH_KEYS here, TOKENIZER_KEYS in tokenizer.py), known to be
irrelevant (the lists below, each with its reason), has a value that is what kiln computes anyway (*_HARMLESS), or
makes compile fail naming it. Likewise every tensor is read by the schedule (expected_shapes) or refused. A key
added to a reader must be added to its list here; `tests/unit/test_refuse.py` checks the two real models.
"""
from __future__ import annotations

from .config import ModelConfig, _is_num, _show, expected_shapes, meta_int
from .config_archs import ROPE_SCALING_KEYS
from .gguf_file import GGUFModel, escape, quote
from .tokenizer import TOKENIZER_HARMLESS, TOKENIZER_IRRELEVANT, TOKENIZER_IRRELEVANT_PREFIXES, TOKENIZER_KEYS

# "{arch}." keys each architecture's reader reads (_read_config + its ARCH_CONFIG function)
_COMMON_KEYS = frozenset(["block_count", "context_length", "embedding_length", "feed_forward_length",
                          "attention.head_count", "attention.head_count_kv", "attention.key_length",
                          "attention.value_length",   # checked equal to key_length (_read_config)
                          "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "vocab_size"])
ARCH_KEYS = {
    "llama": _COMMON_KEYS | ROPE_SCALING_KEYS,
    "qwen2": _COMMON_KEYS | ROPE_SCALING_KEYS,
    "qwen3": _COMMON_KEYS | ROPE_SCALING_KEYS,
    "phi3": _COMMON_KEYS | ROPE_SCALING_KEYS | {"attention.sliding_window"},
    "gemma2": _COMMON_KEYS | ROPE_SCALING_KEYS | {"attention.sliding_window", "attention.sliding_window_pattern",
                                                  "attention.scale", "attn_logit_softcapping",
                                                  "final_logit_softcapping"},
    "gemma3": _COMMON_KEYS | {"attention.sliding_window", "attention.sliding_window_pattern", "attention.scale",
                              "rope.freq_base_swa", "rope.scaling.type", "rope.scaling.factor",   # refused unless 1
                              "attn_logit_softcapping", "final_logit_softcapping"},              # refused unless 0
}
GENERAL_KEYS = frozenset(["general.architecture", "general.name"])   # read by read_config
# general.* is the file's description (type, author, organization, basename, finetune, size_label, license, tags,
# languages, datasets, base_model.*, source.*, url, uuid, sampling.* hints, ...): none of it changes what the model
# computes. Two of them describe the tensors instead: general.file_type (the dominant tensor type) and
# general.quantization_version (the ggml quant format revision): both are implied by each tensor's own ggml type,
# which is what kiln reads; general.alignment is read by the GGUF reader (gguf_file.py). GGUF.* are the header fields
# (version, tensor_count, kv_count) gguf.GGUFReader exposes as fields.
IRRELEVANT_PREFIXES = ("general.", "GGUF.") + TOKENIZER_IRRELEVANT_PREFIXES


def _scaling_off(m: GGUFModel, arch: str) -> bool:
    """No rope scaling: no type or "none", or linear by a factor of 1 (0 = unset: llama.cpp reads it as 1)."""
    kind, factor = m.get(f"{arch}.rope.scaling.type", "none"), m.get(f"{arch}.rope.scaling.factor", 1.0)
    return kind in ("none", "") or (kind == "linear" and _is_num(factor, 0, 1))


# "{arch}." keys no reader needs when their value is the neutral one (value, model, arch) -> bool; other values refused
ARCH_HARMLESS = {
    "rope.scaling.type": lambda v, m, a: _scaling_off(m, a),
    "rope.scaling.factor": lambda v, m, a: _is_num(v, 0, 1) and _scaling_off(m, a),   # a factor 1 scales nothing
    "rope.scale_linear": lambda v, m, a: _is_num(v, 0, 1),                            # the old name of that factor
    # read only by rope scaling (yarn / llama3 / longrope), which is refused when on
    # (linear scaling does not read it either)
    "rope.scaling.original_context_length": lambda v, m, a: _scaling_off(m, a) or
    m.get(f"{a}.rope.scaling.type") == "linear",
    "rope.scaling.finetuned": lambda v, m, a: True,       # descriptive: llama.cpp reads it and uses it for nothing
    # a window at least as long as the trained context never slides (0 = none): kiln never runs past context_length
    "attention.sliding_window": lambda v, m, a: _is_num(v, 0) or (
        _is_num(v, v) and v >= meta_int(m, f"{a}.context_length", 2048)),
    "attn_logit_softcapping": lambda v, m, a: _is_num(v, 0),    # 0 = no soft-capping
    "final_logit_softcapping": lambda v, m, a: _is_num(v, 0),
    "expert_count": lambda v, m, a: _is_num(v, 0),              # 0 experts = a dense model (what kiln runs)
    "expert_used_count": lambda v, m, a: _is_num(v, 0),
    "attention.causal": lambda v, m, a: v is True,       # kiln's attention is causal
}


def unsupported(m: GGUFModel, c: ModelConfig) -> list[str]:
    """Every metadata key and tensor of the file that kiln does not implement, as "key = 'value'" / "tensor 'name'"
    (escaped), in file order: keys first, then tensors."""
    arch, out = c.arch, []
    consumed = GENERAL_KEYS | TOKENIZER_KEYS | {f"{arch}.{k}" for k in ARCH_KEYS[arch]}
    for key in m.reader.fields:
        if key in consumed or key in TOKENIZER_IRRELEVANT or key.startswith(IRRELEVANT_PREFIXES):
            continue
        v = m.get(key)
        suffix = key[len(arch) + 1:] if key.startswith(arch + ".") else None
        if key in TOKENIZER_HARMLESS and TOKENIZER_HARMLESS[key][0](v):
            continue
        if suffix in ARCH_HARMLESS and ARCH_HARMLESS[suffix](v, m, arch):   # a value of the wrong kind is not harmless
            continue
        out.append(f"{escape(key)} = {_show(v)}")
    expect = expected_shapes(c)
    out += [f"tensor {quote(n)}" for n in m.tensors if n not in expect]
    return out
