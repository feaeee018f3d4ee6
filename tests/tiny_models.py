"""Tiny causal LMs of every architecture the installed transformers maps in
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, built from each one's default config with the size
fields shrunk (hidden 32, 2 layers, vocab 96, few heads/experts). No hand-picked list:
``tiny_model(model_type)`` either returns a model or raises ``Skip`` with the reason."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

VOCAB = 96
HIDDEN = 32
LAYERS = 2
MAX_PARAMS = 20_000_000

# field -> value, applied wherever a config (or a sub-config) has the field
_SIZES = {
    "vocab_size": VOCAB,
    "n_vocab": VOCAB,
    "text_vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "n_embd": HIDDEN,
    "n_embed": HIDDEN,
    "dim": HIDDEN,
    "embed_dim": HIDDEN,
    "embedding_size": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "emb_dim": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_blocks": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "decoder_layers": LAYERS,
    "encoder_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "multi_query_group_num": 2,
    "head_dim": 8,
    "attention_head_dim": 8,
    "kv_channels": 8,
    "rotary_dim": 8,
    "rotary_emb_base": None,
    "global_head_dim": 8,
    "swa_head_dim": 8,
    "intermediate_size": 48,
    "n_inner": 48,
    "ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "encoder_ffn_dim": 48,
    "d_ff": 48,
    "ffn_hidden_size": 48,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "mlp_hidden_size": 48,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "moe_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "qk_head_dim": 16,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "num_kv_shared_layers": 0,
    "attention_hidden_size": HIDDEN,
    "lru_width": HIDDEN,
    "embedding_dim": HIDDEN,
    "state_size": 8,
    "d_state": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "time_step_rank": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "num_memory_blocks": 1,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "max_seq_len": 64,
    "max_sequence_length": 64,
    "sliding_window": 8,
    "attention_window": 8,
}
_TOKEN_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_token_index",
    "video_token_id",
    "audio_token_id",
)


class Skip(Exception):
    """This architecture cannot be built tiny on this CPU (the message says why)."""


def _shrink(cfg, depth=0):
    if depth > 3:
        return
    n_layers_before = getattr(cfg, "num_hidden_layers", None)
    for name, value in _SIZES.items():
        if value is None:
            continue
        if name in cfg.__dict__ and isinstance(cfg.__dict__[name], int) and not isinstance(cfg.__dict__[name], bool):
            old = cfg.__dict__[name]
            if name == "max_position_embeddings" or name in (
                "n_positions",
                "n_ctx",
                "max_seq_len",
                "max_sequence_length",
            ):
                value = min(old, 64) if old >= 16 else old
            setattr(cfg, name, value)
    for name in ("head_dim", "num_key_value_heads"):  # None by default in some configs
        if name in cfg.__dict__ and cfg.__dict__[name] is None:
            setattr(cfg, name, _SIZES[name])
    d = cfg.__dict__
    if d.get("kv_lora_rank") and "num_key_value_heads" in d:  # MLA: one key per query head
        cfg.num_key_value_heads = d.get("num_attention_heads", 4)
    if isinstance(d.get("expand"), int) and "num_heads" in d and isinstance(d.get("head_dim"), int):
        cfg.num_heads = d["expand"] * HIDDEN // d["head_dim"]  # Mamba2: heads x head_dim = expand x hidden
    # per-layer lists follow the layer count; the layers kept include one of every kind
    n_layers = getattr(cfg, "num_hidden_layers", None)
    per_layer = [
        name
        for name, value in cfg.__dict__.items()
        if isinstance(value, (list, tuple)) and n_layers_before and len(value) == n_layers_before
    ]
    if per_layer and n_layers:
        keep = set(range(min(n_layers, n_layers_before)))
        for name in per_layer:
            first = {}
            for i, v in enumerate(cfg.__dict__[name]):
                first.setdefault(repr(v), i)
            keep |= set(first.values())
        keep = sorted(keep)[:6]
        for name in per_layer:
            value = cfg.__dict__[name]
            setattr(cfg, name, type(value)(value[i] for i in keep))
        cfg.num_hidden_layers = len(keep)
    for name in _TOKEN_FIELDS:
        value = cfg.__dict__.get(name)
        if isinstance(value, int) and value >= VOCAB:
            setattr(cfg, name, VOCAB - 1 - _TOKEN_FIELDS.index(name))
        elif isinstance(value, list):
            setattr(cfg, name, [v if v < VOCAB else VOCAB - 1 for v in value])
    for value in list(cfg.__dict__.values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value, depth + 1)


def _text(cfg):
    try:
        return cfg.get_text_config()
    except ValueError:  # several text configs (e.g. musicgen's encoder and decoder)
        return getattr(cfg, "decoder", cfg)


def causal_lm_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_model(model_type: str, *, tie: bool | None = None, dtype=torch.float64):
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            cls = getattr(transformers, cls_name)
        except Exception as e:  # a missing optional package
            raise Skip(
                f"{cls_name} cannot be imported: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            ) from e
        try:
            cfg = CONFIG_MAPPING[model_type]()
        except Exception as e:
            raise Skip(f"no default config: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}") from e
        _shrink(cfg)
        if getattr(cfg, "is_encoder_decoder", False) and hasattr(cfg, "is_decoder"):
            cfg.is_decoder = True
        if hasattr(cfg, "is_decoder") and not getattr(cfg, "is_encoder_decoder", False):
            cfg.is_decoder = True
        for c in {id(cfg): cfg, id(_text(cfg)): _text(cfg)}.values():
            for name in (
                "attention_dropout",
                "hidden_dropout",
                "dropout",
                "attn_pdrop",
                "resid_pdrop",
                "embd_pdrop",
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "activation_dropout",
                "classifier_dropout",
            ):
                if isinstance(getattr(c, name, None), float):
                    setattr(c, name, 0.0)
            if tie is not None:
                c.tie_word_embeddings = tie
        if hasattr(cfg, "_attn_implementation"):
            try:
                cfg._attn_implementation = "eager"
            except Exception:
                pass
        torch.manual_seed(0)
        for c in (cfg, _text(cfg)):
            for attr in ("_experts_implementation",):
                try:
                    setattr(c, attr, "eager")  # grouped_mm has no float64
                except Exception:
                    pass
            if getattr(c, "languages", None) and hasattr(c, "default_language"):
                c.default_language = list(c.languages)[0]
        try:
            try:
                model = cls(cfg)
            except (AttributeError, TypeError, KeyError):
                if _text(cfg) is cfg:
                    raise
                model = cls(_text(cfg))  # a text-only class mapped from a multimodal model type
        except Exception as e:
            raise Skip(
                f"cannot be built tiny from its config: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
            ) from e
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise Skip(f"still {n / 1e6:.1f}M parameters after shrinking its config")
    return model.to(dtype)
