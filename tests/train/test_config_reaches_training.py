"""Every Config field that changes training reaches where it acts (issue 25, item 7).

Each such field is set to a value other than its default, and its effect is read where a run
takes it: ``Trainer(cfg)``, then the groups of step 0, then one ``train_step``, watched at the
loss call, the sampler's ``generate``, the optimizer, the scheduler and the gradient clipping,
never by calling a helper with the field's value (a seeded fault that dropped a trainer option
on its way passed tests that called the helpers directly). Every field is listed: a new one must
be probed here or said not to change training.
"""

import dataclasses
import math

import pytest
import torch

from gft_train import config as config_mod
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl

BASE = dict(
    max_steps=3,
    prompts_per_step=2,
    micro_batch_size=4,
    max_length=24,
    max_new_tokens=3,
    lr=1e-3,
    engine="transformers",
    reward="gft_train.demo.sums:reward",
)

# Fields that do not change the training itself, and why.
NOT_TRAINING = {
    "model": "what is trained (every probe trains the demo's tiny model)",
    "train_file": "what it trains on (every probe reads one; columns and groups_file are probed)",
    "output_dir": "where the run is written",
    "save_every": "checkpoints (tests/train/test_train_e2e.py: a killed run resumes to the same weights)",
    "save_total_limit": "checkpoints kept (tests/train/test_train_runs.py)",
    "resume": "continues a run (tests/train/test_train_e2e.py, test_train_runs.py)",
    "overwrite_output_dir": "replaces a run (tests/train/test_train_runs.py)",
    "engine": "auto is the transformers engine where vLLM is not installed (tests/integrations/test_vllm.py on a GPU)",
    "vllm_memory": "vLLM only (tests/integrations/test_vllm.py on a GPU)",
    "eval_file": "evaluation, under a forked RNG: the training is the same (tests/train/test_train_runs.py)",
    "eval_every": "evaluation",
    "eval_n": "evaluation",
    "eval_k": "evaluation",
    "eval_max_prompts": "evaluation",
    "eval_temperature": "evaluation",
    "eval_greedy": "evaluation",
    "eval_kl_samples": "evaluation",
    "eval_split": "evaluation (tests/train/test_datasets_sources.py)",
    "train_split": "which split of train_file is read, like train_file (tests/train/test_datasets_sources.py)",
    "dataset_config": "which subset of a datasets Hub name is read, like train_file",
    "report_to": "the trackers the metrics go to (tests/train/test_trackers.py)",
    "revision": "which snapshot of a Hub id is loaded, like model (tests/train/test_model_loading.py)",
    "trust_remote_code": "whether a Hub model's own code may run (tests/train/test_model_loading.py)",
    "merge_lora": "what the final folder holds besides the adapter (tests/train/test_lora.py)",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fields")
    rows = make_splits(seed=1, n_train=12, n_eval=4)["train"]
    (d / "const_reward.py").write_text(
        "def reward(prompts, completions, answers):\n    return [0.25] * len(completions)\n"
    )
    return dict(
        dir=d,
        model=str(build_model(d / "model", hidden_size=64, layers=1)),
        train=str(write_jsonl(rows, d / "train.jsonl")),
        renamed=str(
            write_jsonl(
                [{"question": r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}} for r in rows],
                d / "renamed.jsonl",
            )
        ),
        bare=str(write_jsonl([{**r, "teachers": []} for r in rows], d / "bare.jsonl")),
        unset=None,
    )


@dataclasses.dataclass
class Run:
    """What one step of a run did."""

    trainer: object
    groups: list
    metrics: dict
    losses: list  # per loss call: tau, reduction, normalizer, entropy_coef, backend, adv, shape, autocast
    generates: list  # per generate call: temperature, top_p, max_new_tokens, rows
    clips: list  # max_norm of each gradient clipping


def _run(data, out, monkeypatch, **fields) -> Run:
    import gft_train.step as step_mod
    from gft_train.trainer import Trainer

    losses, generates, clips = [], [], []
    real_loss = step_mod.causal_lm_gft_loss

    def loss_spy(model, input_ids, attention_mask, labels, adv, **kw):
        options = kw["loss"].options  # the run's GFTLoss, built once
        losses.append(
            dict(
                tau=options.loss.tau,
                reduction=options.loss.reduction,
                normalizer=kw["normalizer"],
                entropy_coef=options.policy.entropy_coef,
                backend=options.run.backend,
                adv=adv.detach().clone(),
                shape=tuple(input_ids.shape),
                autocast=torch.is_autocast_enabled("cpu"),
                **({"packed": True} if kw.get("seq_ids") is not None else {}),
            )
        )
        return real_loss(model, input_ids, attention_mask, labels, adv, **kw)

    monkeypatch.setattr(step_mod, "causal_lm_gft_loss", loss_spy)
    cfg = config_mod.Config(
        **{**BASE, "model": data["model"], "train_file": data["train"], "output_dir": str(out), **fields}
    )
    trainer = Trainer(cfg)
    model = trainer.model
    real_generate = model.generate

    def generate_spy(**kw):
        generates.append(
            dict(
                temperature=kw["temperature"],
                top_p=kw["top_p"],
                max_new_tokens=kw["max_new_tokens"],
                rows=kw["input_ids"].shape[0],
            )
        )
        return real_generate(**kw)

    model.generate = generate_spy
    real_clip = trainer.acc.clip_grad_norm_
    trainer.acc.clip_grad_norm_ = lambda params, max_norm, *a, **k: clips.append(max_norm) or real_clip(
        params, max_norm, *a, **k
    )
    groups = trainer._groups_for_step(0)
    metrics = trainer.train_step(groups)
    return Run(trainer, groups, metrics, losses, generates, clips)


@pytest.fixture(scope="module")
def default(data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _run(data, tmp_path_factory.mktemp("default") / "o", mp)


def _sources(run) -> list[list[str]]:
    return [[r.source for r in g.responses] for g in run.groups]


def _advantages(run) -> list[float]:
    return [r.advantage for g in run.groups for r in g.responses]


def _group_advantages(rewards, eps):
    n, mean = len(rewards), sum(rewards) / len(rewards)
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1))
    return [0.0 if std == 0 else (x - mean) / (std + eps) for x in rewards]


def _lr(run) -> float:
    return run.metrics["lr"]


def _check_refresh(run, default):
    before = len(run.generates)
    assert run.trainer._groups_for_step(1) and len(run.generates) == before  # step 1: the same pool
    assert run.trainer.pool.start == 0
    calls = len(default.generates)
    default.trainer._groups_for_step(1)
    assert len(default.generates) > calls  # the default: sampled anew
    return True


def _check_adv_eps(run, default):
    for g in run.groups:
        want = _group_advantages([r.reward for r in g.responses], 1.0)
        assert [r.advantage for r in g.responses] == pytest.approx(want)
    assert _advantages(run) != pytest.approx(_advantages(default))
    return True


def _lora_scaling(run) -> set:
    return {m.scaling["default"] for m in run.trainer.model.modules() if isinstance(getattr(m, "scaling", None), dict)}


def _lora_dropouts(run) -> set:
    return {m.lora_dropout["default"].p for m in run.trainer.model.modules() if hasattr(m, "lora_dropout")}


# field -> (extra Config fields, value, check(run, default)); the run is Trainer -> groups -> step.
PROBES = {
    "method": (
        {},
        "sft",
        lambda r, d: _sources(r) == [["expert"]] * 2
        and r.losses[0]["tau"] == 0.0
        and set(_advantages(r)) == {1.0}
        and not r.generates,
    ),
    "dcr": ({}, False, lambda r, d: {c["tau"] for c in r.losses} == {0.0} and d.losses[0]["tau"] == 0.7),
    "gal": (
        {},
        False,
        lambda r, d: _sources(r) == [["expert"]] * 2 and set(_advantages(r)) == {1.0} and r.losses[0]["tau"] == 0.7,
    ),
    "n_expert": ({}, 2, lambda r, d: all(s.count("expert") == 2 for s in _sources(r))),
    "n_teacher": ({}, 1, lambda r, d: all(s.count("teacher") == 1 for s in _sources(r))),
    "n_self": (
        {},
        1,
        lambda r, d: all(s.count("self") == 1 for s in _sources(r)) and sum(g["rows"] for g in r.generates) == 2,
    ),
    "teacher_model": (
        {"train_file": "bare"},
        "model",  # the rows have no teachers: generated
        lambda r, d: all(s.count("teacher") == 3 for s in _sources(r)),
    ),
    "reward": (
        {},
        "const_reward:reward",
        lambda r, d: {x.reward for g in r.groups for x in g.responses} == {0.25} and set(_advantages(r)) == {0.0},
    ),
    "adv_eps": ({}, 1.0, _check_adv_eps),
    "groups_file": (
        {},
        "groups",
        lambda r, d: not r.generates
        and {g.prompt for g in r.groups} <= {g.prompt for g in d.groups}
        and r.trainer.cfg.refresh_every == 0,
    ),
    "refresh_every": ({}, 2, _check_refresh),
    "max_new_tokens": (
        {},
        2,
        lambda r, d: {g["max_new_tokens"] for g in r.generates} == {2}
        and all(len(x.token_ids) <= 2 for g in r.groups for x in g.responses if x.source == "self"),
    ),
    "temperature": ({}, 0.5, lambda r, d: {g["temperature"] for g in r.generates} == {0.5}),
    "top_p": ({}, 0.9, lambda r, d: {g["top_p"] for g in r.generates} == {0.9}),
    "rollout_batch_size": ({}, 3, lambda r, d: [g["rows"] for g in r.generates] == [3, 3, 2]),
    "tau": ({}, 0.3, lambda r, d: {c["tau"] for c in r.losses} == {0.3}),
    "loss_aggregation": (
        {},
        "seq-mean-token-sum-norm",
        lambda r, d: {c["reduction"] for c in r.losses} == {"mean"}
        and r.losses[0]["normalizer"] == 16 * 24
        and d.losses[0]["normalizer"] == r.metrics["tokens"],
    ),
    "entropy_coef": ({}, 0.1, lambda r, d: {c["entropy_coef"] for c in r.losses} == {0.1}),
    "loss_backend": (
        {},
        "reference",
        lambda r, d: {c["backend"] for c in r.losses} == {"reference"} and {c["backend"] for c in d.losses} == {"auto"},
    ),
    "lr": (
        {},
        5e-3,
        lambda r, d: r.trainer.optimizer.param_groups[0]["initial_lr"] == 5e-3 and _lr(r) == pytest.approx(_lr(d) * 5),
    ),
    "lr_scheduler": ({}, "constant", lambda r, d: _lr(r) == 1e-3 and _lr(d) == pytest.approx(1e-3 * 0.75)),
    "warmup_steps": ({}, 2, lambda r, d: _lr(r) == pytest.approx(1e-3 / 2)),
    "weight_decay": ({}, 0.1, lambda r, d: r.trainer.optimizer.param_groups[0]["weight_decay"] == 0.1),
    "max_steps": ({}, 6, lambda r, d: _lr(r) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 6)))),
    "num_epochs": (
        {"max_steps": "unset"},  # a max_steps given beside num_epochs wins (tests/train/test_checks.py)
        1.0,
        lambda r, d: r.trainer.cfg.max_steps == 6 and _lr(r) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 6))),
    ),
    "prompts_per_step": ({}, 3, lambda r, d: len(r.groups) == 3 and sum(c["shape"][0] for c in r.losses) == 24),
    "micro_batch_size": ({}, 16, lambda r, d: [c["shape"][0] for c in r.losses] == [16] and len(d.losses) == 4),
    "max_grad_norm": ({}, 0.01, lambda r, d: r.clips == [0.01] and d.clips == [1.0]),
    "bf16": ({}, True, lambda r, d: all(c["autocast"] for c in r.losses) and not any(c["autocast"] for c in d.losses)),
    "gradient_checkpointing": (
        {},
        True,
        lambda r, d: r.trainer.model.is_gradient_checkpointing and not d.trainer.model.is_gradient_checkpointing,
    ),
    "max_length": (
        {},
        7,
        lambda r, d: max(c["shape"][1] for c in r.losses) <= 7 < max(c["shape"][1] for c in d.losses)
        and r.metrics["completions/cut_frac"] > 0,
    ),
    "seed": ({}, 7, lambda r, d: [g.prompt for g in r.groups] != [g.prompt for g in d.groups]),
    "packed": (
        {},
        True,
        # best-fit rows: never more token slots than the padded micro-batches
        lambda r, d: all(c.get("packed") for c in r.losses)
        and sum(c["shape"][0] * c["shape"][1] for c in r.losses) <= sum(c["shape"][0] * c["shape"][1] for c in d.losses)
        and not any(c.get("packed") for c in d.losses)
        and r.metrics["tokens"] == d.metrics["tokens"],
    ),
    "attn_implementation": (
        {},
        "eager",
        lambda r, d: r.trainer.model.config._attn_implementation == "eager"
        and d.trainer.model.config._attn_implementation != "eager",
    ),
    "torch_dtype": (
        {},
        "bfloat16",
        lambda r, d: r.trainer.model.dtype == torch.bfloat16
        and d.trainer.model.dtype == torch.float32
        and {p.dtype for g in r.trainer.optimizer.param_groups for p in g["params"]} == {torch.bfloat16},
    ),
    "lora_r": (
        {},
        4,
        lambda r, d: {n.split(".")[-3] for n, p in r.trainer.model.named_parameters() if p.requires_grad}
        == {"lora_A", "lora_B"}
        and sum(p.numel() for g in r.trainer.optimizer.param_groups for p in g["params"])
        == sum(p.numel() for p in r.trainer.model.parameters() if p.requires_grad)
        and r.trainer.model.peft_config["default"].r == 4,
    ),
    "lora_alpha": ({"lora_r": 4}, 2.0, lambda r, d: _lora_scaling(r) == {0.5}),
    "lora_dropout": ({"lora_r": 4}, 0.25, lambda r, d: _lora_dropouts(r) == {0.25}),
    "lora_target_modules": (
        {"lora_r": 4},
        "q_proj,v_proj",
        lambda r, d: {n.split(".")[-4] for n, p in r.trainer.model.named_parameters() if p.requires_grad}
        == {"q_proj", "v_proj"},
    ),
    "columns": (
        {"train_file": "renamed"},
        "prompt=question",
        lambda r, d: [g.prompt for g in r.groups] == [g.prompt for g in d.groups],
    ),
}


def test_every_field_is_probed_or_said_not_to_change_training():
    fields = {f.name for f in dataclasses.fields(config_mod.Config)}
    assert not set(PROBES) & set(NOT_TRAINING)
    assert set(PROBES) | set(NOT_TRAINING) == fields, fields ^ (set(PROBES) | set(NOT_TRAINING))


def test_the_run_builds_its_loss_once(data, tmp_path, monkeypatch):
    """The trainer holds one GFTLoss built from the Config; a step's micro-batches call it (no
    options are built again on the way from the flag to the head)."""
    from gft_kernels.options import LossOptions
    from gft_train.trainer import Trainer

    cfg = config_mod.Config(
        **{**BASE, "model": data["model"], "train_file": data["train"], "output_dir": str(tmp_path), "tau": 0.3}
    )
    trainer = Trainer(cfg)
    built = []
    real = LossOptions.build.__func__
    monkeypatch.setattr(LossOptions, "build", classmethod(lambda cls, *a, **k: built.append(a) or real(cls, *a, **k)))
    assert trainer.train_step(trainer._groups_for_step(0))["tokens"] > 0
    assert built == []
    assert trainer.acc.unwrap_model(trainer.policy).loss is trainer.loss
    assert trainer.loss.tau == 0.3 and trainer.loss.options.run.return_stats


@pytest.mark.parametrize("name", sorted(PROBES))
def test_a_field_set_in_the_config_acts_in_the_run(name, data, default, tmp_path, monkeypatch, request):
    extra, value, check = PROBES[name]
    if name == "bf16":  # accelerate keeps one mixed precision per process: a fresh state, and one after
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    extra = {k: data[v] if isinstance(v, str) else v for k, v in extra.items()}
    if name == "reward":
        monkeypatch.syspath_prepend(str(data["dir"]))
    if name == "groups_file":
        from gft_train.groups import save_groups

        save_groups(default.groups, tmp_path / "groups.jsonl")
        value = str(tmp_path / "groups.jsonl")
    if name == "teacher_model":
        value = data["model"]
    assert getattr(config_mod.Config(), name) != value
    run = _run(data, tmp_path / "o", monkeypatch, **extra, **{name: value})
    assert check(run, default), name
