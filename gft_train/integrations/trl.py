"""GFT for TRL users: ``GFTTrainer`` on top of TRL's ``GRPOTrainer``.

Everything TRL does stays TRL's: the dataset and its sampler, generation (transformers, or
vLLM in server or colocate mode), reward functions with TRL's signature
(``fn(prompts, completions, completion_ids, **columns) -> list[float]``), group advantages
(``scale_rewards``, ``multi_objective_aggregation``), the loss aggregation of ``loss_type``,
gradient accumulation, PEFT, logging and checkpoints. Two things change:

- **The groups.** Of each prompt's ``num_generations`` slots, the first ``n_expert`` hold the
  dataset's expert response (column ``expert_column``, a string) and the next ``n_teacher``
  its teacher responses (column ``teacher_column``, a list of strings); only the remaining
  slots are sampled from the model. A demonstration's ids are those the model would produce
  after TRL's prompt ids (``gft_train.render``: the chat template's assistant turn with its
  end-of-turn token for chat-message prompts, the text and eos for text prompts).
  Demonstrations are scored by the same reward functions, so every response gets its
  group-standardized advantage (the paper's hybrid group).
- **The update.** The loss is GFT's ``-A * C(p) * log p`` through the fused op
  (``gft_kernels``), from the model's last hidden states and its output head, with no
  ``[tokens x vocab]`` logits. Token weights follow ``loss_type`` exactly as TRL aggregates
  its own per-token loss (``dapo``, ``grpo``, ``bnpo``, ``dr_grpo``, ``luspo``, ``cispo``,
  ``sapo``), and vLLM's importance-sampling correction multiplies the advantages.

With no demonstrations and ``tau = 0`` the loss is the on-policy policy gradient: its
gradient is the one TRL's own GRPO loss takes at importance ratio 1 (tested).

Not supported (refused at construction with a message): ``num_iterations > 1`` (GFT's loss has
no importance ratio to clip), ``beta != 0`` (the KL term), ``loss_type="vespo"``, the entropy
mask and bonus, the off-policy mask, and demonstrations together with tools, environments, a
custom ``rollout_func`` or images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import trl

# The TRL releases this integration is tested with (tests/integrations/test_trl.py, test_peft.py); it overrides
# two private GRPOTrainer methods, which a minor TRL release may change without notice.
TESTED_TRL = ">=1.16,<1.17"


def check_trl_version(version: str) -> None:
    """Refuses a TRL outside ``TESTED_TRL`` with an error naming the tested range."""
    from packaging.version import Version

    if not Version("1.16") <= Version(version) < Version("1.17"):
        raise ImportError(
            f"gft_train's TRL integration is tested with trl{TESTED_TRL}, found trl {version}: "
            f"pip install 'trl{TESTED_TRL}' (or 'gft[trl]')"
        )


check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.data_utils import is_conversational  # noqa: E402

from gft_kernels.head import TRL_LOSS_TYPES, aggregation_reduction, reduction_weights  # noqa: E402
from gft_kernels.models import causal_lm_gft_loss, causal_lm_logprobs, check_model  # noqa: E402
from gft_kernels.options import IGNORE_INDEX, check_tau  # noqa: E402

from ..groups import SOURCES  # noqa: E402
from ..render import render  # noqa: E402

_LOSS_TYPES = tuple(TRL_LOSS_TYPES)


@dataclass
class GFTConfig(GRPOConfig):
    """``GRPOConfig`` plus GFT's settings. ``num_generations`` is the whole group size K."""

    tau: float = field(
        default=0.7,
        metadata={
            "help": "DCR threshold: C(p) = sg(p) below tau, 1 at or above (0: policy gradient; > 1: DFT weighting)."
        },
    )
    n_expert: int = field(default=1, metadata={"help": "Slots per group holding the expert response."})
    n_teacher: int = field(
        default=0,
        metadata={
            "help": "Slots per group holding teacher responses (the paper: num_generations=8, n_expert=1, n_teacher=3)."
        },
    )
    expert_column: str = field(default="expert", metadata={"help": "Dataset column with the expert response."})
    teacher_column: str = field(
        default="teachers", metadata={"help": "Dataset column with a list of teacher responses."}
    )
    gft_backend: str = field(default="auto", metadata={"help": "gft_kernels backend: auto, triton, torch, reference."})

    def __post_init__(self):
        super().__post_init__()
        check_tau(self.tau)
        for name in ("n_expert", "n_teacher"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.n_expert + self.n_teacher > self.num_generations:
            raise ValueError(
                f"n_expert + n_teacher = {self.n_expert + self.n_teacher} exceeds the group size "
                f"num_generations = {self.num_generations}"
            )


def _demo_text(value, where):
    """A demonstration as text: a string, or an assistant message / list of messages."""
    if isinstance(value, dict):
        value = value.get("content")
    elif isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        value = "".join(m.get("content") or "" for m in value if m.get("role", "assistant") == "assistant")
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string (or assistant message), got {type(value).__name__}")
    return value


def _install_gft_forward(model):
    """Let ``model(..., gft={...})`` return the GFT loss from inside the model's forward.

    The loss runs inside the forward so that whatever wraps the model (DDP, PEFT, accelerate)
    sees one forward call, as with TRL's own fused head; any call without ``gft`` goes to the
    forward that was there before (TRL's, which generation and log-prob scoring use).
    """
    if "_gft_trl_inner" in model.__dict__:
        return
    inner = model.forward
    model.__dict__["_gft_trl_inner"] = inner

    @functools.wraps(inner)
    def forward(*args, gft=None, gft_logprobs=None, **kwargs):
        if gft is None and gft_logprobs is None:
            return inner(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        attention_mask = kwargs.pop("attention_mask", None)
        for name in (
            "labels",
            "return_dict",
            "output_attentions",
            "output_hidden_states",
            "num_items_in_batch",
            "inputs_embeds",
        ):
            if kwargs.get(name) is None:
                kwargs.pop(name, None)
        if gft_logprobs is not None:
            out = causal_lm_logprobs(model, input_ids, attention_mask, **gft_logprobs, **kwargs)
            return {"log_probs": out.logp, "entropy": out.entropy}
        loss, stats = causal_lm_gft_loss(
            model,
            input_ids,
            attention_mask,
            None,
            gft["adv"],
            gft["tau"],
            shift_labels=gft["targets"],
            reduction="sum",
            return_stats=True,
            backend=gft["backend"],
            temperature=gft["temperature"],
            **kwargs,
        )
        return {"loss": loss, "gft_stats": stats}

    model.forward = forward


class GFTTrainer(GRPOTrainer):
    """TRL's GRPO trainer with GFT's hybrid groups and fused loss; takes a ``GFTConfig``.

    The dataset needs ``prompt`` (as for GRPO) and, when ``n_expert`` / ``n_teacher`` > 0, the
    expert and teacher columns. A row missing them stops training with an error naming the row.
    """

    def __init__(self, model, reward_funcs, args: GFTConfig | None = None, **kwargs):
        if args is None:
            args = GFTConfig(output_dir="gft-trl")
        if not isinstance(args, GFTConfig):
            raise TypeError(f"GFTTrainer takes a GFTConfig, got {type(args).__name__}")
        self._check_supported(args, kwargs)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._gft_rows = None
        self._gft_sources = None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _install_gft_forward(base)
        # Probe the model's logits path now (the verdict is cached per model): once accelerate
        # wraps the forward in mixed-precision autocast, the probe would see rounded logits.
        check_model(base)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **inputs,
    ):
        """TRL's per-token log-probs of the completions (the old policy's, when samples may be
        stale or come from vLLM) through ``gft_kernels.causal_lm_logprobs``: the model's probed
        logits transform, no ``[tokens x vocab]`` logits. Images or the MoE aux loss go to TRL's."""
        if compute_aux_loss or any(v is not None for k, v in inputs.items() if k not in ("num_images", "num_tiles")):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **inputs,
            )
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            options = dict(
                labels=labels,
                temperature=float(self.temperature),
                return_entropy=compute_entropy,
                backend=self.args.gft_backend,
            )
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=mask, gft_logprobs=options)
            logps.append(out["log_probs"][:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(out["entropy"][:, -logits_to_keep:])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    # ---- settings ---------------------------------------------------------------------------

    @staticmethod
    def _check_supported(args, kwargs):
        problems = []
        if args.num_iterations != 1:
            problems.append(f"num_iterations={args.num_iterations} (GFT's loss has no importance ratio to clip; use 1)")
        if args.beta != 0.0:
            problems.append(f"beta={args.beta} (the KL term is not fused; use 0)")
        if args.loss_type not in _LOSS_TYPES:
            problems.append(f"loss_type={args.loss_type!r} (supported: {', '.join(_LOSS_TYPES)})")
        if args.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1 (the entropy mask)")
        if getattr(args, "off_policy_mask_threshold", None) is not None:
            problems.append("off_policy_mask_threshold (the off-policy mask)")
        if getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False):
            problems.append("entropy_coef / use_adaptive_entropy (the entropy bonus)")
        if args.n_expert + args.n_teacher > 0:
            for name in ("tools", "environment_factory", "rollout_func"):
                if kwargs.get(name):
                    problems.append(f"{name} together with expert/teacher responses")
        if problems:
            raise ValueError("GFTTrainer does not support: " + "; ".join(problems))

    @property
    def _n_demo(self) -> int:
        return self.args.n_expert + self.args.n_teacher

    def _slot_source(self, global_index: int) -> str:
        slot = global_index % self.num_generations
        if slot < self.args.n_expert:
            return "expert"
        return "teacher" if slot < self._n_demo else "self"

    # ---- the groups -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        # ``inputs`` is this process's generation batch, the rows TRL generates for (when this step
        # generates): the slots' sources and the rows' demonstrations are known from here on
        if self._n_demo > 0:
            offset = self.accelerator.process_index * len(inputs)
            self._gft_rows = inputs
            self._gft_sources = [self._slot_source(offset + i) for i in range(len(inputs))]
            if any(x.get("images") is not None or x.get("image") is not None for x in inputs):
                raise ValueError("GFTTrainer: expert/teacher responses with image prompts are not supported")
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._gft_rows = None
            self._gft_sources = None

    def _demo_ids(self, index: int, source: str) -> list[int]:
        row = self._gft_rows[index]
        args = self.args
        if source == "expert":
            if args.expert_column not in row or row[args.expert_column] is None:
                raise ValueError(
                    f"GFTTrainer: a row of prompt {row.get('prompt')!r} has no "
                    f"'{args.expert_column}' column (n_expert={args.n_expert})"
                )
            text = _demo_text(row[args.expert_column], f"column '{args.expert_column}'")
        else:
            slot = (self.accelerator.process_index * len(self._gft_rows) + index) % self.num_generations
            k = slot - args.n_expert
            teachers = row.get(args.teacher_column)
            if not isinstance(teachers, (list, tuple)) or len(teachers) <= k:
                have = len(teachers) if isinstance(teachers, (list, tuple)) else 0
                raise ValueError(
                    f"GFTTrainer: a row of prompt {row.get('prompt')!r} has {have} teacher "
                    f"responses in '{args.teacher_column}'; n_teacher={args.n_teacher} needs "
                    f"{args.n_teacher}"
                )
            text = _demo_text(teachers[k], f"column '{args.teacher_column}'[{k}]")
        return self._demo_render(row.get("prompt"), text)[: self.max_completion_length]

    def _demo_render(self, prompt, text: str) -> list[int]:
        """A demonstration's ids after TRL's prompt ids, as the model produces them at inference
        (``gft_train.render``): TRL renders chat-message prompts with the chat template and
        tokenizes text prompts without it, and so does this."""
        kwargs = dict(getattr(self, "chat_template_kwargs", None) or {})
        if getattr(self, "chat_template", None) is not None:
            kwargs["chat_template"] = self.chat_template
        chat = is_conversational({"prompt": prompt})
        if not chat and not isinstance(prompt, str):
            raise ValueError(f"GFTTrainer: a prompt must be a text or chat messages, got {type(prompt).__name__}")
        return render(self._tokenizer, [(prompt, text)], text_prompts_as_chat=False, template_kwargs=kwargs)[0][1]

    # Private override, kept: TRL has no hook to put dataset responses into some of a group's
    # generation slots (``rollout_func`` would replace its whole generation, vLLM included).
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        sources = self._gft_sources
        if sources is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        n_self = num_generations - self._n_demo
        self_rows = [i for i, s in enumerate(sources) if s == "self"]
        if n_self == 0:
            generated, gen_logprobs = [], None
        elif len(prompt_ids) % num_generations == 0:
            # whole groups on this process: every process samples the same number of rows
            generated, gen_logprobs = super()._generate_single_turn(
                [prompt_ids[i] for i in self_rows], None, {}, n_self, has_tool_images
            )
        else:
            # a group spans processes: sample every slot as TRL would, keep the self slots
            full, full_logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
            generated = [full[i] for i in self_rows]
            gen_logprobs = None if full_logprobs is None else [full_logprobs[i] for i in self_rows]
        completion_ids, logprobs = [], [] if gen_logprobs is not None else None
        it = iter(range(len(self_rows)))
        for i, source in enumerate(sources):
            if source == "self":
                j = next(it)
                completion_ids.append(list(generated[j]))
                if logprobs is not None:
                    logprobs.append(gen_logprobs[j])
            else:
                ids = self._demo_ids(i, source)
                completion_ids.append(ids)
                if logprobs is not None:
                    logprobs.append([None] * len(ids))  # NaN in TRL: no importance-sampling correction
        return completion_ids, logprobs

    # Private override, kept: no public hook sees the combined rewards of each completion, which
    # the per-source reward means (gft/reward/expert, ...) need.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._gft_sources is not None:
            from accelerate.utils import gather_object

            sources = gather_object(list(self._gft_sources))
            weights = self.reward_weights.to(rewards_per_func.device)
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
            for name in SOURCES:
                rows = [i for i, s in enumerate(sources) if s == name]
                if rows:
                    self._metrics["train"][f"gft/reward/{name}"].append(rewards[rows].mean().item())
        return rewards_per_func

    # ---- the update -------------------------------------------------------------------------

    def _token_weights(self, inputs, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-token weights that make ``sum(w * loss_t)`` TRL's aggregation of ``loss_type``: its
        aggregation (``gft_kernels.head.TRL_LOSS_TYPES``, the one map to the kernel's reductions)
        over the counts TRL divides by, through ``gft_kernels.head.reduction_weights``."""
        valid = mask != 0
        B = mask.shape[0]
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        lt = self.loss_type
        if lt in ("dapo", "cispo"):  # the global token mean
            n_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n_tokens = n_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        else:  # bnpo: the local token mean
            n_tokens = valid.sum().clamp(min=1) * ga
        # the seq- ones: over the B sequences of the micro-batch (dr_grpo: B x max_completion_length)
        reduction, normalizer = aggregation_reduction(TRL_LOSS_TYPES[lt], n_tokens, B * ga, self.max_completion_length)
        w = reduction_weights(valid.reshape(-1), reduction, normalizer, mask.shape, torch.float32).reshape(mask.shape)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            w = w * inputs["importance_sampling_ratio"]
        return w

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """transformers' public hook (TRL's ``compute_loss`` calls its own GRPO loss): GFT's loss."""
        if return_outputs:
            raise ValueError("GFTTrainer does not return outputs from compute_loss (as TRL's GRPOTrainer)")
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        B, P = prompt_ids.shape
        C = completion_ids.shape[1]

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        adv = advantages.float() * self._token_weights(inputs, mask, mode)
        # position t predicts token t + 1: the completion's tokens are predicted at P - 1 ... P + C - 2
        targets = torch.full((B, P + C), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        targets[:, P - 1 : P + C - 1] = completion_ids.masked_fill(mask == 0, IGNORE_INDEX)
        adv_full = torch.zeros((B, P + C), dtype=adv.dtype, device=adv.device)
        adv_full[:, P - 1 : P + C - 1] = adv.expand(B, C)

        extra = {}
        for key in ("token_type_ids", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                extra[key] = inputs[key]
        gft = {
            "adv": adv_full,
            "tau": float(self.args.tau),
            "targets": targets,
            "backend": self.args.gft_backend,
            "temperature": float(self.temperature),
        }
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, gft=gft, **extra)
        loss, stats = out["loss"], out["gft_stats"]

        # metrics, as TRL's global token means
        valid = (targets != IGNORE_INDEX).float()
        totals = self.accelerator.reduce(
            torch.stack(
                [
                    (stats.entropy.float() * valid).sum(),
                    stats.rectified_frac.float() * stats.n_valid,
                    stats.mean_prob.float() * stats.n_valid,
                    valid.sum(),
                ]
            ).detach(),
            reduction="sum",
        )
        n = totals[3].clamp(min=1.0)
        self._metrics[mode]["entropy"].append((totals[0] / n).item())
        self._metrics[mode]["gft/rectified_frac"].append((totals[1] / n).item())
        self._metrics[mode]["gft/mean_prob"].append((totals[2] / n).item())
        return loss


__all__ = ["GFTConfig", "GFTTrainer", "SOURCES", "TESTED_TRL", "check_trl_version"]
