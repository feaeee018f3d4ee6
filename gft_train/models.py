"""The models a run loads: the policy, a teacher, a base to compare with, each as (model,
tokenizer with a pad token). A model is a local folder (a saved transformers model, or a LoRA
adapter saved by PEFT) or a Hugging Face Hub id, both through ``from_pretrained``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# --torch-dtype: the loaded weights' dtype, as transformers names them ("auto": the config's torch_dtype)
TORCH_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# A Hub id: a repository name, or a namespace and a name (huggingface_hub's rule, less its length limit)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``--model NAME`` names a Hub repository, not a folder on disk: it is not an
    existing path and has the form of an id (``org/name`` or ``name``). Another form is a path
    (``./m``, ``runs/sft/final``, ``/abs/m``) whether it exists or not."""
    return bool(name) and not Path(name).expanduser().exists() and _HUB_ID.match(name) is not None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, revision: str, error: Exception) -> OSError:
    at = f" at revision {revision!r}" if revision else ""
    if _hub_offline():
        return OSError(
            f"model {name!r}{at} is not a local folder and not in the Hugging Face cache, and the Hub is "
            f"offline (HF_HUB_OFFLINE=1): download it once with network access (hf download {name}), or "
            "pass --model the path of a local folder"
        )
    cause = " ".join(str(error).split())[:200]
    return OSError(
        f"model {name!r}{at} is not a local folder and could not be loaded from the Hugging Face Hub "
        f"({cause}): check the id and --revision, the network and HF_TOKEN (for a gated model), or pass "
        "--model the path of a local folder (with no network, HF_HUB_OFFLINE=1 reads the cache)"
    )


def load_model(
    path: str,
    attn_implementation: str = "",
    *,
    torch_dtype: str = "float32",
    revision: str = "",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) of the causal LM ``path`` names: a local folder or a Hub id, loaded by
    ``from_pretrained`` with ``revision`` and ``trust_remote_code`` as transformers names them,
    weights in ``torch_dtype`` (``TORCH_DTYPES``); ``attn_implementation`` as transformers names
    them ("" for its default). A folder holding a LoRA adapter (PEFT's ``adapter_config.json``,
    no ``config.json``) gives its base model with the adapter merged in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {torch_dtype!r}")
    options = {"revision": revision or None, "trust_remote_code": trust_remote_code}
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hub = is_hub_id(path)
    if not hub:
        p = Path(path).expanduser()
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            return _load_adapter(p, TORCH_DTYPES[torch_dtype], options, extra)
        if not path or not p.is_dir() or not (p / "config.json").is_file():
            raise FileNotFoundError(f"model path {path!r} is not a saved transformers model (no config.json there)")
        path = str(p)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[torch_dtype], **options, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except OSError as e:
        if not hub:
            raise
        raise _hub_error(path, revision, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_adapter(folder: Path, dtype, options: dict, extra: dict):
    """A PEFT LoRA adapter folder as one model: its base (``base_model_name_or_path``) with the
    adapter merged in, and the tokenizer saved beside the adapter."""
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    base, tokenizer = load_model(
        base_name or "",
        extra.get("attn_implementation", ""),
        torch_dtype=next(k for k, v in TORCH_DTYPES.items() if v == dtype),
        trust_remote_code=options["trust_remote_code"],
    )
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def base_model_name(path: str) -> str:
    """What an adapter records as its base: a local folder's absolute path (the run may be read
    from another directory), a Hub id as it is."""
    return path if is_hub_id(path) else os.path.abspath(os.path.expanduser(path))


def model_options(cfg, teacher: bool = False) -> dict:
    """``load_model``'s keywords from a run's configuration: ``revision`` names a snapshot of
    ``--model`` only; the dtype and ``trust_remote_code`` apply to the teacher too."""
    options = {"torch_dtype": cfg.torch_dtype, "trust_remote_code": cfg.trust_remote_code}
    return options if teacher else {**options, "revision": cfg.revision}


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
