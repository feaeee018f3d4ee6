"""LoRA from the command line, through PEFT: the adapter put on the loaded model, checkpoints
that hold the adapter's weights (not the frozen base), and the merged model of ``--merge-lora``.

The fused loss runs through the adapted model as through any causal LM: the adapted layers sit
inside the backbone, the output head stays a plain linear layer (LoRA never targets it), so the
loss and every adapter gradient are those of the model's own logits (tests/train/test_lora.py).
"""

from __future__ import annotations

from pathlib import Path

# PEFT's shorthand for every nn.Linear / Conv1D of the model but its output head
ALL_LINEAR = "all-linear"


def lora_config(cfg):
    """The ``peft.LoraConfig`` of a run (a ``config.Config``: its lora_* fields)."""
    from peft import LoraConfig

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r if cfg.lora_alpha is None else cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout or 0.0,
        target_modules=ALL_LINEAR if not targets or targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, cfg, base_name: str):
    """``model`` wrapped by PEFT with the LoRA adapter the run ``cfg`` asks for (its lora_* fields);
    only the adapter trains. ``base_name`` is what the saved adapter records as its base (a Hub
    id, or a folder's absolute path). Adapter weights stay float32 over bf16/fp16 base weights
    (PEFT's ``autocast_adapter_dtype``), so their optimizer states do too."""
    from peft import get_peft_model

    config = lora_config(cfg)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ValueError(f"lora_target_modules {cfg.lora_target_modules!r}: {' '.join(str(e).split())}") from e
    head = adapted.get_base_model().get_output_embeddings()
    if head is not None and any(p.requires_grad for p in head.parameters()):
        raise ValueError(
            f"lora_target_modules {cfg.lora_target_modules!r} adapts the output head: the fused loss "
            "needs it a plain linear layer; leave it out"
        )
    adapted.peft_config["default"].base_model_name_or_path = base_name
    if cfg.gradient_checkpointing:
        # checkpointed blocks recompute from their input: with the embeddings frozen it needs a grad
        adapted.enable_input_require_grads()
    return adapted


def check_rollout_engine(cfg) -> None:
    """LoRA samples with the transformers engine only: vLLM's in-memory weight sync sends whole
    weights by their names, and an adapted model's are the base's and the adapter's apart."""
    from . import rollout

    samples = cfg.n_self or cfg.eval_every
    if cfg.lora_r and samples and (cfg.engine == "vllm" or (cfg.engine == "auto" and rollout.vllm_available())):
        raise NotImplementedError(
            f"lora_r {cfg.lora_r} with the vLLM rollout engine (engine {cfg.engine!r}) is not supported: "
            "pass --engine transformers, or train without LoRA"
        )


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def keep_adapter_in_checkpoints(acc) -> None:
    """accelerate's checkpoints of this run hold only the trainable weights (the adapter), and a
    resume loads them back over the frozen base the run loaded again. Where accelerate saves the
    weights itself (single process, DDP); FSDP and DeepSpeed write their own, whole, state."""

    def trainable(model) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for i, model in enumerate(models[: len(weights)]):
            keep = trainable(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def on_load(models, input_dir):
        from safetensors import safe_open

        for i, model in enumerate(models):
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not file.is_file():
                continue
            with safe_open(str(file), "pt") as f:
                saved = set(f.keys())
            if saved != trainable(model):
                missing, extra = sorted(trainable(model) - saved)[:3], sorted(saved - trainable(model))[:3]
                raise ValueError(
                    f"--resume: {file} does not hold this run's adapter (missing {missing}, unexpected {extra})"
                )

    acc.register_save_state_pre_hook(on_save)
    acc.register_load_state_pre_hook(on_load)


def write_merged(adapter_dir: Path, cfg, tokenizer) -> Path:
    """``adapter_dir/merged``: the base model loaded again, as the run loaded it, with the saved
    adapter merged in; a plain transformers model (``AutoModelForCausalLM.from_pretrained``)."""
    from peft import PeftModel

    from .models import load_model, model_options, unpartitioned

    base = unpartitioned(lambda: load_model(cfg.model, **model_options(cfg))[0])
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = adapter_dir / "merged"
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
