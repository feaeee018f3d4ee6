"""gft_train pieces: data validation, config, advantages (Eq. 4), pass@k, rewards, the LM helper."""

import json
import math

import pytest
import torch

from gft_train import config as config_mod
from gft_train.data import DataError, load_rows
from gft_train.evaluate import pass_at_k
from gft_train.groups import Group, Response, group_advantages, load_groups, save_groups
from gft_train.rewards import MathReward, load_reward


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "1+1=", "answer": "2", "expert": "2", "teachers": ["2", "3"]}


@pytest.mark.parametrize(
    "bad,field,words",
    [
        ({"answer": "2", "expert": "2"}, "prompt", "missing"),
        ({"prompt": "1+1=", "answer": [2], "expert": "2"}, "answer", "expected a string or a number"),
        ({"prompt": "1+1=", "answer": "2", "expert": ""}, "expert", "empty"),
        ({"prompt": "1+1=", "answer": "2", "expert": "2", "teachers": "2"}, "teachers", "list of strings"),
        ("{not json", "*", "not JSON"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad, field, words):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as info:
        load_rows(path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and repr(field) in msg and words in msg, msg
    assert info.value.row == 2 and info.value.field == field


def test_numeric_answers_are_read_as_text(tmp_path):
    """GSM8K-style rows carry numbers; the reward compares text, so 72 is read as "72" (a
    boolean is not a number here)."""
    rows = load_rows(_write(tmp_path / "d.jsonl", [dict(GOOD, answer=72), dict(GOOD, answer=2.5)]))
    assert [r.answer for r in rows] == ["72", "2.5"]
    with pytest.raises(DataError, match="expected a string or a number, got bool"):
        load_rows(_write(tmp_path / "b.jsonl", [dict(GOOD, answer=True)]))


def test_parquet_rows_are_read_and_checked(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "teachers": None}]).to_parquet(str(tmp_path / "d.parquet"))
    rows = load_rows(tmp_path / "d.parquet")
    assert [r.teachers for r in rows] == [["2", "3"], []]
    datasets.Dataset.from_list([GOOD, {**GOOD, "expert": None}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="row 1: field 'expert'"):
        load_rows(tmp_path / "bad.parquet")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_rows(tmp_path / "e.jsonl")


def test_group_advantages_follow_eq4_with_the_sample_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    r = torch.tensor(rewards, dtype=torch.float64)
    expected = (r - r.mean()) / (r.std() + 1e-6)  # torch.std: the sample std, as the authors' code
    assert torch.allclose(torch.tensor(group_advantages(rewards), dtype=torch.float64), expected)
    assert group_advantages([0.3] * 5) == [0.0] * 5
    assert group_advantages([1.0]) == [0.0]


def test_pass_at_k_matches_brute_force():
    from itertools import combinations

    n, c = 6, 2
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(outcomes, k))
        brute = sum(1 for s in subsets if any(s)) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute)


def test_config_presets_flags_and_yaml(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    (tmp_path / "c.yaml").write_text("method: gft\nlr: 0.001\nmax_steps: 7\n")
    cfg = config_mod.from_args(
        p.parse_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9", "--no-dcr"])
    ).resolved()
    assert (cfg.lr, cfg.max_steps, cfg.tau, cfg.n_expert, cfg.n_teacher, cfg.n_self) == (0.001, 9, 0.0, 1, 3, 4)
    no_gal = config_mod.Config(gal=False).resolved()
    assert (no_gal.uses_group_advantage, no_gal.n_expert, no_gal.n_teacher, no_gal.n_self, no_gal.tau) == (
        False,
        1,
        0,
        0,
        0.7,
    )  # the paper's w/o GAL: demonstrations with DCR
    assert config_mod.Config(gal=False, n_teacher=3).resolved().n_teacher == 3
    with pytest.raises(ValueError, match="n_self must be 0"):
        config_mod.Config(gal=False, n_self=4).resolved()
    # online groups refreshed every step are the default with self-samples; offline stays available
    assert config_mod.Config().resolved().refresh_every == 1
    assert config_mod.Config(method="grpo").resolved().refresh_every == 1
    assert config_mod.Config(method="sft").resolved().refresh_every == 0
    assert config_mod.Config(groups_file="g.jsonl").resolved().refresh_every == 0
    assert config_mod.Config(refresh_every=0).resolved().refresh_every == 0
    assert config_mod.Config(refresh_every=4).resolved().refresh_every == 4
    assert config_mod.Config().eval_temperature == 0.5  # the paper's evaluation temperature
    sft = config_mod.Config(method="sft").resolved()
    assert (sft.tau, sft.n_self, sft.uses_group_advantage) == (0.0, 0, False)
    assert math.isinf(config_mod.Config(method="dft").resolved().tau)
    grpo = config_mod.Config(method="grpo").resolved()
    assert (grpo.n_expert, grpo.n_self, grpo.tau, grpo.uses_group_advantage) == (0, 8, 0.0, True)
    with pytest.raises(ValueError, match="method must be one of"):
        config_mod.Config(method="ppo").resolved()
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config fields"):
        config_mod.from_args(p.parse_args(["--config", str(tmp_path / "bad.yaml")]))


def _shown_default(value):
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "''" if value == "" else str(value)


@pytest.mark.parametrize("command", ["train", "build-groups", "eval"])
def test_cli_help_lists_every_field_with_help_and_default(command, capsys, monkeypatch):
    import dataclasses

    from gft_train.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one line per flag
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    entries = []  # one per option: its flags, then its help (argparse may put the help on the next line)
    for line in out.split("options:")[1].splitlines():
        if line.strip().startswith("-"):
            entries.append(line.strip())
        elif line.strip() and entries:
            entries[-1] += " " + line.strip()
    lines = {e.split("  ")[0]: e for e in entries}
    defaults = dataclasses.asdict(config_mod.Config())
    for f in dataclasses.fields(config_mod.Config):
        dashed = "--" + f.name.replace("_", "-")
        line = next((v for k, v in lines.items() if dashed in k.replace(",", " ").split()), None)
        assert line is not None, f"{dashed} missing from `gft-train {command} --help`"
        assert f.metadata["help"] and f.metadata["help"] in line, line
        assert line.rstrip().endswith(f"(default: {_shown_default(defaults[f.name])})"), line
    assert "--config" in out and "--no-dcr" in out and "--no-gal" in out


def test_cli_top_level_help_names_the_commands(capsys):
    from gft_train.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "build-groups", "train", "eval", "--help"):
        assert command in out


def test_cli_flag_forms(tmp_path):
    import argparse
    import dataclasses

    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    parse = lambda *argv: config_mod.from_args(p.parse_args(list(argv)))  # noqa: E731
    assert parse("--eval-k", "1,8").eval_k == [1, 8] == parse("--eval_k", "1", "8").eval_k
    assert (parse("--bf16").bf16, parse("--bf16", "false").bf16, parse("--no-gal").gal) == (True, False, False)
    assert parse("--tau", "inf").tau == math.inf and parse("--n-self", "2").n_self == 2
    assert parse() == config_mod.Config()
    (tmp_path / "c.yaml").write_text("bf16: true\neval_k: [2]\n")
    cfg = parse("--config", str(tmp_path / "c.yaml"))
    assert (cfg.bf16, cfg.eval_k) == (True, [2])  # defaults of unset flags never override the YAML
    assert dataclasses.fields(config_mod.Config)[0].type == "str"  # the parser left Config's fields alone


# A gft_config.yaml as the trainer wrote it before Config was split into groups (a resolved
# Config(model="m", train_file="t.jsonl", lr=3e-4, eval_k=[1, 8])): old run dirs must still resume.
OLD_SAVED_CONFIG = """\
method: gft
dcr: true
gal: true
model: m
train_file: t.jsonl
columns: ''
eval_file: ''
output_dir: runs/gft
n_expert: 1
n_teacher: 3
n_self: 4
teacher_model: ''
reward: math
adv_eps: 1.0e-06
groups_file: ''
refresh_every: 1
engine: auto
max_new_tokens: 256
temperature: 1.0
top_p: 1.0
rollout_batch_size: 64
vllm_memory: 0.3
tau: 0.7
loss_aggregation: token-mean
entropy_coef: 0.0
lr: 0.0003
lr_scheduler: cosine
warmup_steps: 0
weight_decay: 0.0
max_steps: 100
num_epochs: 0.0
prompts_per_step: 8
micro_batch_size: 8
max_grad_norm: 1.0
bf16: false
gradient_checkpointing: false
max_length: 1024
seed: 0
save_every: 0
save_total_limit: 0
resume: false
overwrite_output_dir: false
eval_every: 0
eval_n: 4
eval_k:
- 1
- 8
eval_max_prompts: 0
eval_temperature: 0.5
eval_greedy: true
eval_kl_samples: 1
"""


def test_saved_config_format_is_the_one_old_runs_hold(tmp_path):
    """The same flat mapping, keys in the same order (a field added later is one more key: an old
    file lacks it, and a resume compares the fields the old file has)."""
    import yaml

    cfg = config_mod.Config(model="m", train_file="t.jsonl", lr=3e-4, eval_k=[1, 8]).resolved()
    config_mod.save(cfg, tmp_path / "new.yaml")
    new, old = yaml.safe_load((tmp_path / "new.yaml").read_text()), yaml.safe_load(OLD_SAVED_CONFIG)
    assert [k for k in new if k in old] == list(old) and {k: new[k] for k in old} == old
    (tmp_path / "old.yaml").write_text(OLD_SAVED_CONFIG)
    assert config_mod.changed_fields(config_mod.load_saved(tmp_path / "old.yaml"), cfg) == {}


def test_config_groups_hold_every_field_once():
    import dataclasses

    groups = (
        config_mod.ModelAndData,
        config_mod.GroupMix,
        config_mod.Rollout,
        config_mod.Optimization,
        config_mod.Logging,
        config_mod.Evaluation,
    )
    names = [f.name for g in groups for f in dataclasses.fields(g)]
    assert names == [f.name for f in dataclasses.fields(config_mod.Config)]  # flat, in the old order
    cfg = config_mod.Config(lr=0.5, n_self=2, eval_n=3, engine="transformers", save_every=4, model="m")
    assert (
        cfg.optimization.lr,
        cfg.groups.n_self,
        cfg.evaluation.eval_n,
        cfg.rollout.engine,
        cfg.logging.save_every,
        cfg.model_and_data.model,
    ) == (0.5, 2, 3, "transformers", 4, "m")


def _readme_gft_train_flags() -> set[str]:
    """The --flags the trainer's guide (docs/trainer.md, once the README's trainer section) shows (`accelerate launch`'s and the placeholders
    `--x` / `--no-x` of the flag forms left out)."""
    import re
    from pathlib import Path

    section = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", section))
    return flags - {"--multi_gpu", "--num_processes", "--config_file", "--x", "--no-x"}


def test_every_flag_the_readme_shows_parses_to_its_field(tmp_path):
    import argparse

    from gft_train.cli import main

    flags = _readme_gft_train_flags()
    assert {"--resume", "--max-steps", "--eval-k", "--no-dcr", "--columns"} <= flags, flags
    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--base-model")
    hints = {f.name for f in __import__("dataclasses").fields(config_mod.Config)}
    for flag in sorted(flags):
        action = next((a for a in p._actions if flag in a.option_strings), None)
        assert action is not None, f"the README shows {flag}, which gft-train train does not take"
        if action.dest in ("config", "debug", "base_model", "help"):
            continue
        assert action.dest in hints, (flag, action.dest)
    with pytest.raises(SystemExit):  # and the parser is the CLI's: an unknown flag is refused there
        main(["train", "--no-such-flag"])


def test_every_field_is_a_yaml_key_and_a_flag(tmp_path):
    """Each field set in YAML, and by its flag, to a value other than its default reaches the Config."""
    import argparse
    import dataclasses

    import yaml

    other = {
        bool: lambda v: not v,
        int: lambda v: (v or 0) + 2,
        float: lambda v: (v or 0.0) + 0.25,
        str: lambda v: v + "x",
        list: lambda v: v + [16],
    }
    import typing

    defaults = config_mod.Config()
    hints = typing.get_type_hints(config_mod.Config)
    values = {}
    for f in dataclasses.fields(config_mod.Config):
        v = getattr(defaults, f.name)
        kind = type(v)
        if v is None:  # (an optional field: its type is the hint's other member; int | None -> int)
            kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
            kind = typing.get_origin(kind) or kind
            v = [] if kind is list else v
        values[f.name] = other[kind](v)
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(values))
    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    from_yaml = config_mod.from_args(p.parse_args(["--config", str(tmp_path / "all.yaml")]))
    argv = []
    for name, v in values.items():
        argv += [f"--{name.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    from_flags = config_mod.from_args(p.parse_args(argv))
    for name, v in values.items():
        assert getattr(from_yaml, name) == v, name
        assert getattr(from_flags, name) == v, name


def test_math_reward_and_user_reward(tmp_path, monkeypatch):
    reward = MathReward()
    try:
        assert reward(["q"] * 3, ["81", "\\boxed{0.5}", "12"], ["81", "\\frac{1}{2}", "13"]) == [1.0, 1.0, 0.0]
    finally:
        reward.close()
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, answers):\n    return [float(len(c)) for c in completions]\n"
        "def short(prompts, completions, answers):\n    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")(["a", "b"], ["xy", "z"], ["", ""]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        load_reward("my_rewards:short")(["a", "b"], ["xy", "z"], ["", ""])
    with pytest.raises(ValueError, match="no function 'nothing'"):
        load_reward("my_rewards:nothing")


def test_groups_round_trip(tmp_path):
    groups = [
        Group(
            "1+1=",
            "2",
            [
                Response("2", "expert", 1.0, 0.5),
                Response("3", "self", 0.0, -0.5, [5, 1], False),
                Response("33", "self", 0.0, -0.5, [5, 5], True),
            ],
            "f:0",
        )
    ]
    save_groups(groups, tmp_path / "g.jsonl")
    assert load_groups(tmp_path / "g.jsonl") == groups


def test_causal_lm_helper_equals_gft_on_the_model_logits(tmp_path):
    """The public helper (backbone + fused loss) against GFT computed from the model's own logits."""
    import gft_kernels
    from gft_train.demo.model import build_model
    from gft_train.lm import causal_lm_gft_loss, encode
    from gft_train.trainer import load_model

    model, tok = load_model(str(build_model(tmp_path / "m")))
    batch = encode(tok, [("12+7=", "19", 1.5), ("3+4=", "8", -0.7), ("20+20=", "40", 0.0)], 16)
    loss = causal_lm_gft_loss(model, batch.input_ids, batch.attention_mask, batch.labels, batch.adv, 0.7)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    p = logp.detach().exp()
    valid = targets != -100
    ref = -(torch.where(valid, batch.adv[:, None] * torch.where(p < 0.7, p, 1.0) * logp, 0.0)).sum() / valid.sum()
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert batch.labels[0, :5].eq(-100).all()  # prompt tokens are masked
    assert isinstance(gft_kernels.GFTLoss(), torch.nn.Module)


@pytest.mark.parametrize("name", config_mod.LOSS_AGGREGATIONS)
def test_trainer_loss_aggregations_on_the_model_logits(tmp_path, name):
    """Each trainer aggregation equals its definition computed from the model's own logits, with
    the global counts the trainer passes (one process here)."""
    from gft_train.demo.model import build_model
    from gft_train.lm import encode
    from gft_train.trainer import GFTPolicy, aggregation, load_model, run_loss

    model, tok = load_model(str(build_model(tmp_path / "m")))
    batch = encode(tok, [("12+7=", "19", 1.5), ("3+4=", "8", -0.7), ("20+20=", "40", 0.3)], 16)
    _, normalizer = aggregation(name, batch.n_valid, batch.n_seqs, 16)
    loss_fn = run_loss(config_mod.Optimization(tau=0.7, loss_aggregation=name, entropy_coef=0.01))
    loss, sums = GFTPolicy(model, loss_fn)(batch, normalizer)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    p = logp.detach().exp()
    valid = targets != -100
    per_tok = torch.where(valid, -batch.adv[:, None] * torch.where(p < 0.7, p, 1.0) * logp - 0.01 * entropy, 0.0)
    seq_sum, seq_n = per_tok.sum(1), valid.sum(1)
    want = {
        "token-mean": per_tok.sum() / valid.sum(),
        "seq-mean-token-mean": (seq_sum / seq_n).mean(),
        "seq-mean-token-sum": seq_sum.mean(),
        "seq-mean-token-sum-norm": per_tok.sum() / (3 * 16),
    }[name]
    torch.testing.assert_close(loss, want)
    assert 0.0 <= float(sums[4] / sums[3]) <= 1.0  # token accuracy


def test_unknown_loss_aggregation_is_refused():
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        config_mod.Config(model="m", train_file="t", loss_aggregation="mean").resolved()


# ---- rollouts: the sampled token ids go to the batches as they are ------------------------------


class _FakeGenerateModel(torch.nn.Module):
    """Stands in for a causal LM in ``TransformersEngine``: ``generate`` appends fixed rows."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kw):
        assert kw["max_new_tokens"] == 4
        new = torch.tensor([self.rows[i % len(self.rows)] for i in range(input_ids.shape[0])])
        return torch.cat([input_ids, new], dim=1)


def _tiny_tokenizer():
    from gft_train.demo.model import build_tokenizer

    return build_tokenizer()


def test_transformers_engine_returns_the_sampled_ids_cut_at_eos():
    from gft_train.rollout import TransformersEngine

    tok = _tiny_tokenizer()
    one, nine, pad, eos = (tok.convert_tokens_to_ids(t) for t in ("1", "9", "<pad>", "<eos>"))
    # row 0 ends with a sampled EOS (generate pads after it); row 1 is cut off at max_new_tokens,
    # and holds a pad id the model sampled, which a decode + re-encode would lose
    model = _FakeGenerateModel([[one, nine, eos, pad], [one, pad, nine, nine]])
    samples = TransformersEngine(model, tok, max_new_tokens=4).sample(["12+7="], 2, seed=0)[0]
    assert (samples[0].token_ids, samples[0].text, samples[0].truncated) == ([one, nine, eos], "19", False)
    assert (samples[1].token_ids, samples[1].text, samples[1].truncated) == ([one, pad, nine, nine], "199", True)
    assert tok("199", add_special_tokens=False)["input_ids"] != samples[1].token_ids


def test_transformers_engine_sampling_leaves_the_global_rng_as_it_was():
    """A rollout seeds generation from its own seed; the random stream after it is the one
    before it (a rollout once reseeded the global RNG: everything after it drew other numbers)."""
    from gft_train.rollout import TransformersEngine

    tok = _tiny_tokenizer()
    one, nine, eos = (tok.convert_tokens_to_ids(t) for t in ("1", "9", "<eos>"))
    engine = TransformersEngine(_FakeGenerateModel([[one, nine, eos, eos]]), tok, max_new_tokens=4, batch_size=1)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    engine.sample(["12+7=", "1+1="], 2, seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_self_samples_are_trained_on_the_sampled_ids_without_an_added_eos():
    from gft_train.data import PromptRow
    from gft_train.groups import build_groups
    from gft_train.lm import encode, prompt_ids
    from gft_train.rollout import TransformersEngine

    tok = _tiny_tokenizer()
    one, nine, pad, eos = (tok.convert_tokens_to_ids(t) for t in ("1", "9", "<pad>", "<eos>"))
    engine = TransformersEngine(
        _FakeGenerateModel([[one, nine, eos, pad], [one, pad, nine, nine]]), tok, max_new_tokens=4
    )
    cfg = config_mod.Config(n_teacher=1, n_self=2).resolved()
    rows = [PromptRow("12+7=", "19", "19", ["18"], "t:0")]
    group = build_groups(rows, cfg, engine, lambda p, c, a: [float(x == y) for x, y in zip(c, a)])[0]
    assert [r.source for r in group.responses] == ["expert", "teacher", "self", "self"]
    assert [r.train_input for r in group.responses] == ["19", "18", [one, nine, eos], [one, pad, nine, nine]]
    assert [r.truncated for r in group.responses] == [False, False, False, True]
    # the trainer's batch: prompt ids masked, then the response ids; texts get EOS, sampled ids as sampled
    batch = encode(tok, [(group.prompt, r.train_input, r.advantage) for r in group.responses], 32)
    p = prompt_ids(tok, "12+7=")
    responses = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        n = sum(1 for x in labels if x != -100)
        assert labels[: len(p)] == [-100] * len(p) and ids[: len(p)] == p
        responses.append(labels[len(p) : len(p) + n])
    assert responses == [
        [one, nine, eos],
        [one, tok.convert_tokens_to_ids("8"), eos],
        [one, nine, eos],
        [one, pad, nine, nine],
    ]  # the truncated sample: no EOS


def test_without_gal_the_groups_hold_only_demonstrations():
    from gft_train.data import PromptRow
    from gft_train.groups import build_groups

    cfg = config_mod.Config(method="gft", gal=False).resolved()
    rows = [PromptRow("12+7=", "19", "19", ["18", "19", "20"], "t:0"), PromptRow("3+4=", "7", "7", ["7"], "t:1")]
    groups = build_groups(rows, cfg, None, lambda p, c, a: [float(x == y) for x, y in zip(c, a)])
    for g, row in zip(groups, rows):
        assert [(r.source, r.text, r.advantage) for r in g.responses] == [("expert", row.expert, 1.0)]
    assert cfg.tau == 0.7 and cfg.refresh_every == 0


# ---- evaluation: one function, the paper's metrics --------------------------------------------


class _ListEngine:
    def __init__(self, outs):
        self.outs, self.calls = outs, []

    def generate(self, prompts, n, *, seed=0, temperature=None):
        self.calls.append((n, temperature))
        return [self.outs[p][:n] for p in prompts]


def test_accuracy_reports_pass_at_k_and_distinct_correct_answers():
    from gft_train.data import PromptRow
    from gft_train.evaluate import accuracy, pass_ks

    rows = [PromptRow("a", "1", "1"), PromptRow("b", "2", "2")]
    engine = _ListEngine({"a": ["1", "1 ", "x", "y"], "b": ["2", "z", "2", "w"]})
    reward = lambda p, c, a: [float(x.strip() == y) for x, y in zip(c, a)]  # noqa: E731
    out = accuracy(engine, rows, reward, 4, ks=(3,), seed=0, temperature=0.5)
    assert pass_ks(4, (3,)) == [1, 2, 3, 4] and pass_ks(6) == [1, 2, 4, 6]
    assert math.isclose(out["pass@1"], 0.5)
    for k in (2, 3, 4):
        assert math.isclose(out[f"pass@{k}"], pass_at_k(4, 2, k))
    assert out["distinct_correct"] == 1.0  # "1" and "1 " are one answer; "2" twice is one
    assert out["per_prompt"] == [0.5, 0.5]  # each prompt's own pass@1, in the rows' order
    assert engine.calls == [(4, 0.5)]


def test_cli_demo_and_study_share_one_evaluation_function(tmp_path, monkeypatch, capsys):
    """gft-train eval, the demo and the study all evaluate through gft_train.evaluate.evaluate_model."""
    import gft_train.evaluate
    import gft_train.trainer
    from gft_train.cli import main
    from gft_train.demo.model import build_model
    from gft_train.demo.run import SPLITS, run_demo
    from gft_train.demo.task import make_splits, write_jsonl
    from study.run import QUICK, evaluate

    calls = []

    def fake(model_dir, splits, cfg, *, base_dir=None, kl_split=None, reward_fn=None):
        calls.append((str(model_dir), list(splits), cfg.eval_temperature))
        out = {
            s: {
                "pass@1": 0.5,
                "greedy_pass@1": 0.25,
                f"pass@{cfg.eval_n}": 0.75,
                "distinct_correct": 1.0,
                "per_prompt": [0.5],
            }
            for s in splits
        }
        if base_dir is not None:
            out.update(kl_to_base=0.1, kl_base_model=0.2)
        return out

    monkeypatch.setattr(gft_train.evaluate, "evaluate_model", fake)
    model = build_model(tmp_path / "m")
    splits = make_splits(seed=0, n_train=8, n_eval=4)
    data = {k: write_jsonl(v, tmp_path / "data" / f"{k}.jsonl") for k, v in splits.items()}
    main(["eval", "--model", str(model), "--eval-file", str(data["eval_id"]), "--base-model", str(model)])
    printed = capsys.readouterr().out  # this test's own imports may have logged first (DeepSpeed's, on stdout)
    summary = json.loads(printed[printed.index("\n{") + 1 :] if not printed.startswith("{") else printed)
    assert summary["kl_base_model"] == 0.2 and "per_prompt" not in summary
    files = {
        name: write_jsonl(splits["eval_id"], tmp_path / "data" / f"{name}.jsonl") for name in ("test", "ood", "probe")
    }
    row = evaluate(model, model, files, QUICK, seed=0)
    assert (row["id_greedy"], row["kl_base"]) == (0.25, 0.2)
    monkeypatch.setattr(gft_train.trainer, "train", lambda cfg: model)
    result = run_demo(tmp_path / "demo", quick=True)
    assert result["results"]["GFT"]["kl_base_model"] == 0.2
    callers = [c[1] for c in calls]
    assert callers[0] == ["eval"]  # the CLI
    assert ["id", "ood", "probe"] in callers and ["id"] in callers  # the study
    assert callers.count(list(SPLITS)) == 3  # the demo: base, SFT and GFT
    assert {c[2] for c in calls} == {0.5}


def test_kl_to_base_both_ways(tmp_path):
    """KL(model || base) on expert answers and KL(base || model) on the base's own samples: 0 for
    the base itself, positive and different for a moved model; the latter equals its definition
    on the base's sampled ids."""
    import copy

    from gft_train.data import PromptRow
    from gft_train.demo.model import build_model
    from gft_train.evaluate import kl_base_to_model, kl_to_base
    from gft_train.lm import encode
    from gft_train.rollout import TransformersEngine
    from gft_train.trainer import load_model

    base, tok = load_model(str(build_model(tmp_path / "m")))
    rows = [PromptRow("12+7=", "19", "19"), PromptRow("3+4=", "7", "7")]
    assert kl_to_base(base, base, tok, rows) == 0.0
    assert abs(kl_base_to_model(base, base, tok, rows, n=2, max_new_tokens=4)) < 1e-6
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    forward = kl_to_base(model, base, tok, rows)
    backward = kl_base_to_model(model, base, tok, rows, n=2, max_new_tokens=4, seed=3)
    assert forward > 0 and backward > 0 and forward != backward
    samples = TransformersEngine(base, tok, max_new_tokens=4, temperature=1.0).sample(
        [r.prompt for r in rows], 2, seed=3
    )
    batch = encode(tok, [(r.prompt, s.token_ids, 1.0) for r, ss in zip(rows, samples) for s in ss], 64)
    with torch.no_grad():
        lb = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].log_softmax(-1)
        lm = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].log_softmax(-1)
    mask = batch.labels[:, 1:] != -100
    want = (lb.exp() * (lb - lm)).sum(-1)[mask].mean().item()
    assert math.isclose(backward, want, rel_tol=1e-5)


def test_encode_tokenizes_like_one_text_at_a_time_with_a_chat_template():
    from gft_train.lm import encode, format_prompt

    tok = _tiny_tokenizer()
    # the assistant turn follows the generation prompt "=" as it is rendered (render.render refuses
    # a template that renders the conversation otherwise); it marks no end of turn: eos ends it
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}={{ m['content'] }}"
        "{% else %}({{ m['content'] }}){% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    items = [("12+7", "19", 1.0), ("3+4", [5, 6, 1], -0.5), ("1+1", "2", 0.0)]
    batch = encode(tok, items, 32)
    for row, labels, (prompt, response, _) in zip(batch.input_ids.tolist(), batch.labels.tolist(), items):
        p = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        r = (
            tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if isinstance(response, str)
            else response
        )
        n = len(p) + len(r)
        assert format_prompt(tok, prompt) == f"({prompt})="
        assert row[:n] == p + r and labels[:n] == [-100] * len(p) + r
        assert set(row[n:]) <= {tok.pad_token_id} and set(labels[n:]) <= {-100}
    assert batch.adv.tolist() == [1.0, -0.5, 0.0]


def test_yaml_values_are_converted_and_checked_like_their_flags(tmp_path):
    """PyYAML reads `1e-3` as a string: every YAML value is converted to its field's type (issue 22, 1)."""
    import argparse

    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    path = tmp_path / "c.yaml"
    path.write_text('lr: 1e-3\ntau: "0.5"\nmax_steps: "7"\nbf16: "false"\neval_k: "1,4"\nn_self: null\nmodel: 2024\n')
    cfg = config_mod.from_args(p.parse_args(["--config", str(path)]))
    assert (cfg.lr, cfg.tau, cfg.max_steps, cfg.bf16, cfg.eval_k, cfg.n_self, cfg.model) == (
        1e-3,
        0.5,
        7,
        False,
        [1, 4],
        None,
        "2024",
    )
    assert type(cfg.lr) is float and type(cfg.tau) is float and type(cfg.max_steps) is int
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)  # crashed on the string
    for text, field, words in [
        ("lr: fast\n", "lr", "a number"),
        ("max_steps: 2.5\n", "max_steps", "an integer"),
        ("bf16: maybe\n", "bf16", "true or false"),
        ("model: [a]\n", "model", "a string"),
        ("eval_k: [1, x]\n", "eval_k", "an integer"),
        ("tau: true\n", "tau", "a number"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            config_mod.from_args(p.parse_args(["--config", str(path)]))
        msg = str(info.value)
        assert str(path) in msg and repr(field) in msg and words in msg, msg


def test_chat_prompts_trl_completions_and_column_mapping(tmp_path):
    """Chat-message prompts, TRL's `completion` column (text or assistant messages), a column mapping,
    with the same file/row/field errors (issue 22)."""
    chat = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": chat, "answer": "2", "completion": "2"},
            {"prompt": "1+1=", "answer": "2", "completion": [{"role": "assistant", "content": "2"}]},
        ],
    )
    rows = load_rows(path)
    assert (rows[0].prompt, rows[0].expert, rows[1].prompt, rows[1].expert) == (chat, "2", "1+1=", "2")
    mapped = _write(tmp_path / "m.jsonl", [{"question": chat, "gold": "2", "solution": "2", "others": ["3"]}])
    row = load_rows(mapped, "prompt=question, answer=gold,expert=solution,teachers=others")[0]
    assert (row.prompt, row.answer, row.expert, row.teachers) == (chat, "2", "2", ["3"])
    for bad, field, words in [
        (
            {"question": [{"role": "user", "content": 3}], "gold": "2", "solution": "2"},
            "question[0].content",
            "a string",
        ),
        ({"question": [{"role": "boss", "content": "x"}], "gold": "2", "solution": "2"}, "question[0].role", "one of"),
        ({"question": "1+1=", "solution": "2"}, "gold", "missing"),
        ({"question": 5, "gold": "2", "solution": "2"}, "question", "a list of chat messages"),
    ]:
        with pytest.raises(DataError) as info:
            load_rows(_write(tmp_path / "b.jsonl", [bad]), "prompt=question,answer=gold,expert=solution")
        assert f"line 1: field {field!r}" in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        load_rows(mapped, "question")


def test_chat_prompts_go_through_the_chat_template():
    from gft_train.lm import encode, format_prompt

    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(tok, [{"role": "user", "content": "1+1="}])
    # the demo's character tokenizer knows digits and + - * = ( ): a system message is marked with -
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}*{{ m['content'] }}{% else %}"
        "({% if m['role'] == 'system' %}-{% endif %}{{ m['content'] }}){% endif %}"
        "{% endfor %}{% if add_generation_prompt %}*{% endif %}"
    )
    msgs = [{"role": "system", "content": "9"}, {"role": "user", "content": "1+1="}]
    assert format_prompt(tok, msgs) == "(-9)(1+1=)*"
    assert format_prompt(tok, "1+1=") == "(1+1=)*"  # a text prompt is one user message
    batch = encode(tok, [(msgs, "2", 1.0)], 64)
    assert tok.decode(batch.input_ids[0][batch.labels[0] == -100]).replace(" ", "") == "(-9)(1+1=)*"


def test_a_response_cut_at_max_length_is_counted_and_said_once(tmp_path):
    """The reward scores a response's whole text; the loss trains what fits in max_length. A cut
    is counted per step (completions/cut_frac) and said once per run."""
    import warnings

    from gft_train.config import Config
    from gft_train.demo.model import build_model
    from gft_train.demo.task import write_jsonl
    from gft_train.trainer import Trainer

    rows = [
        dict(prompt="3+4=", answer="7", expert="3+4=7", teachers=[]),  # 4 + 5 + EOS = 10 tokens: cut
        dict(prompt="1+1=", answer="2", expert="2", teachers=[]),
    ]  # 4 + 1 + EOS = 6: whole
    cfg = Config(
        method="sft",
        model=str(build_model(tmp_path / "m", hidden_size=64, layers=1)),
        train_file=str(write_jsonl(rows, tmp_path / "t.jsonl")),
        output_dir=str(tmp_path / "o"),
        prompts_per_step=2,
        micro_batch_size=2,
        max_length=8,
        reward="gft_train.demo.sums:reward",
    )
    trainer = Trainer(cfg)
    with pytest.warns(UserWarning, match=r"1 of 2 responses of step 1 are cut at max_length \(8\)"):
        metrics = trainer.train_step(trainer._groups_for_step(0))
    assert metrics["completions/cut_frac"] == 0.5
    trainer.step = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second step counts, does not warn
        assert trainer.train_step(trainer._groups_for_step(1))["completions/cut_frac"] == 0.5


def test_a_checkpoint_is_renamed_only_after_every_process_wrote_into_it(tmp_path):
    """accelerate's save_state writes from every process (each its RNG state; shards under
    FSDP / ZeRO-3) with no barrier after it: the main process renamed step-N.tmp while another
    rank still wrote into it (a ZeRO-3 resume test failed: 'step-3.tmp does not exist')."""
    from pathlib import Path

    from gft_train import checkpoints
    from gft_train.groups import Group

    out = tmp_path / "run"
    seen = []  # at each barrier: whether the checkpoint was still under its temporary name

    class OneOfTwoProcesses:
        is_main_process = True

        def save_state(self, path):
            Path(path).mkdir(parents=True)
            seen.append("save_state")

        def wait_for_everyone(self):
            seen.append("tmp" if (out / "checkpoints" / "step-2.tmp").is_dir() else "no tmp")

    cfg = config_mod.Config(model="m", train_file="t").resolved()
    checkpoints.save_checkpoint(OneOfTwoProcesses(), out, cfg, 2, [Group("1+1=", "2")], 0)
    after = seen[seen.index("save_state") + 1 :]
    assert after and after[0] == "tmp", seen  # the others finish writing before the rename
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
