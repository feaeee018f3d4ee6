"""A tiny Qwen2-style causal LM built from a config, with a character-level tokenizer.

Nothing comes from a hub: the tokenizer is built with ``tokenizers``, the model from a
``Qwen2Config``, and both are saved with ``save_pretrained`` so every later step (training,
vLLM, evaluation) loads them from disk like a real model. ``head_dim`` is 64, the smallest
vLLM's CPU attention accepts.
"""

from __future__ import annotations

from pathlib import Path

CHARS = list("0123456789+-*=() ")
SPECIALS = ["<pad>", "<eos>"]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(path: Path, *, hidden_size=128, layers=2, seed=0) -> Path:
    """Save a randomly initialized tiny model and its tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
