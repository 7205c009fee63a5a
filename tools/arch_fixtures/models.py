"""The test models: one Hugging Face config per architecture, tiny but with realistic shapes (head_dim 64, GQA 4/2,
hidden 256 and FFN 512 so K-quants apply), and the "calm" random initialisation (shared/refs/README.md): attention
weights ~0.05, MLP ~0.2, embeddings ~0.005, norm weights near 1, the final norm scaled up so next-token margins are
clear; biases and QK-norm weights are random (not transformers' zeros / ones) so a runtime that drops them is caught.

Each entry: transformers config class + kwargs (transformers 5 spelling), the tokenizer, and the ablations that the
generator measures (how far the reference moves when a feature is ignored: proof that the fixture detects it).
"""
from __future__ import annotations

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
N_VOCAB = 1024      # SmolLM2 trimmed to its first 1024 ids; the SentencePiece model has 1024 pieces
# std of the random weights by role; the final norm's weight is FINAL_NORM x (1 + 0.1 N(0,1))
STD = {"embed": 0.005, "attn": 0.05, "mlp": 0.2, "bias": 0.1, "norm": 0.1, "qk_norm": 0.2}
FINAL_NORM = 150.0   # logits ~ +-40: the top-2 margins scale with it (greedy paths do not change)

COMMON = dict(vocab_size=N_VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5)
SMOL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)

MODELS = {
    # Llama 3.1/3.2 style: rope type llama3 -> the converter writes rope_freqs.weight (per-frequency divisors).
    # original context 64 tokens so the long prompt runs far past the low-frequency threshold (wavelength > 64).
    "llama3": dict(
        config="LlamaConfig", tokenizer="smollm2", seed=1,
        kwargs=dict(**COMMON, **SMOL_IDS, head_dim=HEAD_DIM, max_position_embeddings=1024,
                    tie_word_embeddings=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}),
        ablations={"rope_scaling_ignored": {"config": {"rope_parameters": {"rope_type": "default",
                                                                         "rope_theta": 500000.0}}}}),
    # linear rope scaling (Llama 2 long-context fine-tunes, CodeLlama-style): rope.scaling.type/factor keys
    "llama_linear": dict(
        config="LlamaConfig", tokenizer="smollm2", seed=2,
        kwargs=dict(**COMMON, **SMOL_IDS, head_dim=HEAD_DIM, max_position_embeddings=1024,
                    tie_word_embeddings=True,
                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        ablations={"rope_scaling_ignored": {"config": {"rope_parameters": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}}}}),
    # Qwen 2 / 2.5: Q/K/V biases, rope base 1e6, tied embeddings (the small models)
    "qwen2": dict(
        config="Qwen2Config", tokenizer="smollm2", seed=3,
        # transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_config says, and that
        # class replaces the split regex with Qwen 2's: convert with transformers 4.x
        convert_with="transformers4",
        kwargs=dict(**COMMON, **SMOL_IDS, max_position_embeddings=32768, tie_word_embeddings=True,
                    use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        ablations={"qkv_bias_ignored": {"zero": ["q_proj.bias", "k_proj.bias", "v_proj.bias"]}}),
    # Qwen 3: per-head RMSNorm of q and k before rope (attn_q_norm / attn_k_norm), no biases, explicit head_dim
    "qwen3": dict(
        config="Qwen3Config", tokenizer="smollm2", seed=4,
        kwargs=dict(**COMMON, **SMOL_IDS, head_dim=HEAD_DIM, max_position_embeddings=40960,
                    tie_word_embeddings=True, attention_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        ablations={"qk_norm_ignored": {"identity": ["q_norm", "k_norm"]}}),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj, rope base 1e4 without scaling, original context 4096,
    # sliding_window 2047 in the config (llama.cpp ignores it for phi3; the prompts here are shorter), untied head
    "phi3": dict(
        config="Phi3Config", tokenizer="smollm2", seed=5,
        # the phi3 converter takes the BPE path only for tokenizer_class GPT2Tokenizer (Phi-4-mini's), and
        # transformers 5's GPT2Tokenizer drops SmolLM2's digit split: convert with transformers 4.x
        tokenizer_config={"tokenizer_class": "GPT2Tokenizer"}, convert_with="transformers4",
        kwargs=dict(**COMMON, **SMOL_IDS, max_position_embeddings=4096, original_max_position_embeddings=4096,
                    sliding_window=2047, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                    attention_dropout=0.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        ablations={}),
    # Mistral 7B v0.3 style: rope base 1e6, no sliding window, untied head; llama.cpp writes it as arch `llama`
    "mistral": dict(
        config="MistralConfig", tokenizer="smollm2", seed=6,
        kwargs=dict(**COMMON, **SMOL_IDS, head_dim=HEAD_DIM, max_position_embeddings=32768,
                    tie_word_embeddings=False, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        ablations={}),
    # Gemma 2: attention-logit and final-logit soft-capping, sliding window on even layers (0 slides, 1 global),
    # post-attention / post-FFN norms, embeddings x sqrt(hidden), gelu-tanh, query_pre_attn_scalar = head_dim
    # (what llama.cpp assumes for every size but the 27B). Window 32 so the long prompt exercises it; final cap 30 as
    # Gemma 2 ships; attention cap 2 (Gemma 2: 50) because this calm network's scores are small and 50 would never bite.
    "gemma2": dict(
        config="Gemma2Config", tokenizer="gemma_spm", seed=7, final_norm=60.0,   # logits ~ +-16 before the cap of 30
        kwargs=dict(**COMMON, head_dim=HEAD_DIM, max_position_embeddings=8192, tie_word_embeddings=True,
                    query_pre_attn_scalar=HEAD_DIM, sliding_window=32, attn_logit_softcapping=2.0,
                    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                    pad_token_id=0, eos_token_id=1, bos_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        ablations={"attn_softcap_ignored": {"config": {"attn_logit_softcapping": None}},
                   "final_softcap_ignored": {"config": {"final_logit_softcapping": None}},
                   "sliding_window_ignored": {"config": {"sliding_window": 4096}}}),
}

# the prompts (chat ones are rendered with the model's own chat template, then tokenized with specials parsed)
LONG_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each of the one hundred and twelve "
    "steps while the wind pressed against the narrow windows. At the top he cleaned the great lens, trimmed the wick "
    "and wrote the weather in a leather book: the direction of the wind, the height of the waves, the ships that "
    "passed and the birds that rested on the rail. In winter the storms came from the north and the sea turned grey "
    "and white; in summer the fishing boats returned late with their nets full and their lamps swinging. Years later, "
    "when the light was replaced by an automatic beacon, the book was found on a shelf in the keeper's room, and the "
    "last line said")
PROMPTS = {
    "fact": {"text": "The capital of France is"},
    "code": {"text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return"},
    "chat": {"messages": [{"role": "user", "content": "What is 2 + 2? Answer in one word."}]},
    "long": {"text": LONG_TEXT},
}
N_GEN = 16
