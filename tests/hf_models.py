"""Tiny random transformers models and a tokenizer.json for the longjax.hf tests (and the
pretrained-models notebook's test): made here, no download."""

import tokenizers
import torch
import transformers

VOCAB = 128
ATTENTION = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(ATTENTION, rope_theta=500.0)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(ATTENTION, attention_bias=True,
                                                            tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(ATTENTION, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(ATTENTION)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        ATTENTION, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        conv_kernel=4, initializer_range=0.2)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        head_dim=16, num_heads=4, n_groups=1, chunk_size=8, conv_kernel=4,
        initializer_range=0.2)),
    "mamba2_groups": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        head_dim=16, num_heads=4, n_groups=2, chunk_size=8, conv_kernel=4,
        initializer_range=0.2)),
}


def make_hf_model(family, directory, seed=0):
    """A random transformers model of `family` (every 1-D parameter perturbed, so biases
    and norm weights are not their zeros / ones), saved to `directory`."""
    config_cls, model_cls, fields = FAMILIES[family]
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    if hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model


# Text the test tokenizer learns its merges from (the passkey prompt's words among them).
_TRAINING_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. The pass key is 12345. Remember it. What is the pass key? "
                  "def main():\n    return 0\n") * 20


def make_tokenizer(directory, vocab_size=300):
    """A byte-level BPE `tokenizer.json` with `<s>` (BOS) and `</s>` (EOS), saved to
    `directory`; returns its vocabulary size."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAINING_TEXT], trainer)
    tok.save(str(directory / "tokenizer.json"))
    return tok.get_vocab_size()


def make_llama_with_tokenizer(directory, seed=0):
    """A random Llama whose vocabulary is a byte-level BPE tokenizer's, both saved to
    `directory` (BOS 0, EOS 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(directory)
    config = transformers.LlamaConfig(**dict(ATTENTION, vocab_size=vocab, bos_token_id=0,
                                             eos_token_id=1, max_position_embeddings=64))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model
