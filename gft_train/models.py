"""The models a run loads: the policy, a teacher, a base to compare with (saved transformers
models on disk), each as (model in float32, tokenizer with a pad token)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_model(path: str, attn_implementation: str = ""):
    """(model, tokenizer) of the saved transformers causal LM at ``path``; ``attn_implementation``
    as transformers names them ("" for its default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not path or not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not a saved transformers model (no config.json there)")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(p)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def unpartitioned(build):
    """``build()`` with transformers' DeepSpeed ZeRO-3 hook off: a model loaded while accelerate's
    ZeRO-3 config is active is created partitioned (empty on this rank)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        return build()
    active = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter of the config object
    active = active() if active is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return build()
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)
