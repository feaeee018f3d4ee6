"""gft-train never trains the wrong thing silently (issue 30): every option checked before the
model loads, clipping 0 is no clipping, a diverging run stops, max_steps wins over num_epochs,
SFT needs no answer, and data files as users have them."""

import bz2
import csv
import dataclasses
import gzip
import json
import math
import sys

import pytest
import torch
import yaml

from gft_train import config as config_mod
from gft_train.cli import cli
from gft_train.data import DataError, load_rows
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    rows = make_splits(seed=3, n_train=12, n_eval=4)["train"]
    return dict(
        dir=d,
        rows=rows,
        model=str(build_model(d / "model", hidden_size=64, layers=1)),
        train=str(write_jsonl(rows, d / "train.jsonl")),
        no_answer=str(write_jsonl([{k: v for k, v in r.items() if k != "answer"} for r in rows], d / "sft.jsonl")),
    )


def _run_cli(argv, capsys):
    """``gft-train`` in this process: (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


# ---- item 4: every option checked where it is parsed ----------------------------------------

# field -> bad settings, each (flags, or a YAML mapping for --config, and words the line holds).
# The line must also name the field (as --field, or the YAML key).
BAD = {
    "method": [(["--method", "ppo"], "must be one of")],
    "dcr": [({"dcr": "maybe"}, "expected true or false")],
    "gal": [({"gal": "maybe"}, "expected true or false")],
    "columns": [(["--columns", "question"], "is not FIELD=COLUMN")],
    "output_dir": [(["--output-dir", ""], "non-empty")],
    "train_split": [(["--train-split", ""], "non-empty")],
    "n_expert": [(["--n-expert", "-1"], ">= 0")],
    "n_teacher": [(["--n-teacher", "-1"], ">= 0")],
    "n_self": [(["--n-self", "-1"], ">= 0"), (["--method", "grpo", "--n-self", "0"], "all 0")],
    "reward": [(["--reward", "nomodule"], "'math' or 'package.module:function'")],
    "adv_eps": [(["--adv-eps", "-0.5"], ">= 0"), (["--adv-eps", "nan"], "finite")],
    "refresh_every": [(["--refresh-every", "-1"], ">= 0")],
    "engine": [(["--engine", "fast"], "auto, vllm or transformers")],
    "max_new_tokens": [(["--max-new-tokens", "0"], ">= 1")],
    "temperature": [(["--temperature", "0"], "> 0"), (["--temperature", "inf"], "finite")],
    "top_p": [(["--top-p", "0"], "(0, 1]"), (["--top-p", "1.5"], "(0, 1]")],
    "rollout_batch_size": [(["--rollout-batch-size", "0"], ">= 1")],
    "vllm_memory": [(["--vllm-memory", "0"], "(0, 1]"), (["--vllm-memory", "1.5"], "(0, 1]")],
    "tau": [(["--tau", "-0.5"], ">= 0"), (["--tau", "nan"], "finite")],
    "loss_aggregation": [(["--loss-aggregation", "sum"], "must be one of")],
    "entropy_coef": [(["--entropy-coef", "nan"], "finite")],
    "loss_backend": [(["--loss-backend", "cuda"], "must be one of")],
    "lr": [
        (["--lr", "0"], "> 0"),
        (["--lr", "-0.001"], "> 0"),
        (["--lr", "nan"], "finite"),
        (["--lr", "inf"], "finite"),
    ],
    "lr_scheduler": [(["--lr-scheduler", "reduce_lr_on_plateau"], "must be one of")],
    "warmup_steps": [(["--warmup-steps", "-1"], ">= 0")],
    "weight_decay": [(["--weight-decay", "-0.1"], ">= 0")],
    "max_steps": [(["--max-steps", "0"], ">= 1")],
    "num_epochs": [(["--num-epochs", "-1"], ">= 0"), (["--num-epochs", "inf"], "finite")],
    "prompts_per_step": [(["--prompts-per-step", "0"], ">= 1")],
    "micro_batch_size": [(["--micro-batch-size", "0"], ">= 1")],
    "max_grad_norm": [(["--max-grad-norm", "-1"], ">= 0"), (["--max-grad-norm", "nan"], "finite")],
    "bf16": [({"bf16": "maybe"}, "expected true or false")],
    "gradient_checkpointing": [({"gradient_checkpointing": 2}, "expected true or false")],
    "max_length": [(["--max-length", "0"], ">= 1")],
    "seed": [(["--seed", "-1"], "[0, 2**32)")],
    "packed": [({"packed": "maybe"}, "expected true or false")],
    "save_every": [(["--save-every", "-1"], ">= 0")],
    "save_total_limit": [(["--save-total-limit", "-1"], ">= 0")],
    "resume": [(["--resume", "--overwrite-output-dir"], "contradict")],
    "overwrite_output_dir": [(["--overwrite-output-dir", "--resume"], "contradict")],
    "report_to": [(["--report-to", "nosuch"], "unknown tracker")],
    "eval_every": [(["--eval-every", "-1"], ">= 0")],
    "eval_n": [(["--eval-n", "0"], ">= 1")],
    "eval_k": [
        (["--eval-k", "0"], "k >= 1"),
        (["--eval-file", "e.jsonl", "--eval-n", "2", "--eval-k", "1", "4"], "k <= --eval_n (2)"),
    ],
    "eval_max_prompts": [(["--eval-max-prompts", "-1"], ">= 0")],
    "eval_temperature": [(["--eval-temperature", "0"], "> 0")],
    "eval_greedy": [({"eval_greedy": "maybe"}, "expected true or false")],
    "eval_kl_samples": [(["--eval-kl-samples", "0"], ">= 1")],
    "eval_split": [(["--eval-split", ""], "non-empty")],
    "torch_dtype": [(["--torch-dtype", "fp8"], "one of")],
    "trust_remote_code": [({"trust_remote_code": "maybe"}, "expected true or false")],
    "lora_r": [(["--lora-r", "-1"], ">= 0")],
    "lora_alpha": [(["--lora-r", "4", "--lora-alpha", "0"], "> 0"), (["--lora-alpha", "8"], "need --lora_r > 0")],
    "lora_dropout": [(["--lora-r", "4", "--lora-dropout", "1"], "[0, 1)")],
    "lora_target_modules": [(["--lora-target-modules", "q_proj"], "need --lora_r > 0")],
    "merge_lora": [({"merge_lora": True}, "need --lora_r > 0")],
}

# Fields any value of their type may hold here, and where a bad one is refused.
CHECKED_WHERE_USED = {
    "model": "a model folder: load_model refuses one without config.json, before loading anything",
    "train_file": "a file, folder or dataset name: load_rows refuses what it cannot read (tests below)",
    "eval_file": "likewise",
    "groups_file": "read by load_groups, written by build-groups",
    "teacher_model": "a model folder, like model",
    "dataset_config": "the subset of a Hub dataset: datasets refuses an unknown one",
    "revision": "a Hub revision of model: from_pretrained refuses an unknown one, in one line naming the id",
    "attn_implementation": "transformers' names, kernels-hub names among them: transformers refuses an unknown one",
}


def test_every_field_has_a_bad_value_or_says_where_it_is_checked():
    names = {f.name for f in dataclasses.fields(config_mod.Config)}
    assert set(BAD) | set(CHECKED_WHERE_USED) == names, names ^ (set(BAD) | set(CHECKED_WHERE_USED))
    assert not set(BAD) & set(CHECKED_WHERE_USED)


@pytest.mark.parametrize("name,flags,words", [(n, f, w) for n, cases in BAD.items() for f, w in cases])
def test_a_bad_option_stops_before_the_model_loads_in_one_line(name, flags, words, tmp_path, capsys, monkeypatch):
    """Exit 1, one line naming the flag (or YAML key) and the value, nothing written, and the
    model never loaded."""
    import gft_train.trainer as trainer_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(trainer_mod, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--model", "m", "--train-file", "t.jsonl"]
    if isinstance(flags, dict):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(flags))
        argv += ["--config", "c.yaml", "--output-dir", str(out)]
        value = str(next(iter(flags.values())))
    else:
        argv = argv + ["--output-dir", str(out)] + flags if "--output-dir" not in flags else argv + flags
        value = flags[-1]
    code, err = _run_cli(argv, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("gft-train: error: "), err
    line = err[0]
    assert name in line and words in line and (value in line or value.startswith("--")), line
    assert not out.exists()


# ---- item 2: --max-grad-norm 0 is no clipping ----------------------------------------------


def _trainer(s, tmp_path, **kw):
    from gft_train.trainer import Trainer

    base = dict(
        method="sft",
        model=s["model"],
        train_file=s["train"],
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        prompts_per_step=4,
        micro_batch_size=4,
        max_length=16,
        lr=1e-2,
        reward="gft_train.demo.sums:reward",
    )
    return Trainer(config_mod.Config(**{**base, **kw}))


def test_max_grad_norm_0_trains_unclipped(s, tmp_path):
    """0 was a clip to norm 0: the weights stayed at the base. Now it is the same step as no bound
    at all, and the norm is still reported."""
    base = {k: v.clone() for k, v in _trainer(s, tmp_path / "base").model.state_dict().items()}
    steps = {}
    for bound in (0.0, 1e9):
        trainer = _trainer(s, tmp_path / str(bound), max_grad_norm=bound)
        metrics = trainer.train_step(trainer._groups_for_step(0))
        steps[bound] = (metrics["grad_norm"], trainer.model.state_dict())
    norm, weights = steps[0.0]
    assert math.isfinite(norm) and norm > 0.01 and norm == steps[1e9][0]
    assert all(torch.equal(weights[k], steps[1e9][1][k]) for k in weights)
    assert any(not torch.equal(weights[k], base[k]) for k in weights)


# ---- item 3: a diverging run stops -----------------------------------------------------------


def _strict_rows(path):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_keeps_its_checkpoints_and_writes_no_final_model(s, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "--method", "sft", "--model", s["model"], "--train-file", s["train"], "--output-dir", str(out)]
    argv += ["--max-steps", "6", "--prompts-per-step", "4", "--micro-batch-size", "4", "--max-length", "16"]
    argv += ["--lr", "1e30", "--save-every", "1", "--report-to", "none"]
    code, err = _run_cli(argv, capsys)
    errors = [line for line in err if "error" in line]
    assert code == 1 and len(errors) == 1, err
    line = errors[0]
    assert line.startswith("gft-train: error: training diverged at step ") and "--lr" in line, line
    step = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= step <= 6 and any(f"{what} {v}" in line for what in ("loss", "grad norm") for v in ("nan", "inf")), line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{i}" for i in range(1, step)]
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    rows = _strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, step))


def test_a_non_finite_gradient_norm_stops_the_step_before_the_weights_move(s, tmp_path):
    from gft_train.step import TrainingDiverged

    trainer = _trainer(s, tmp_path, bf16=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_clip = trainer.acc.clip_grad_norm_
    trainer.acc.clip_grad_norm_ = lambda *a, **k: real_clip(*a, **k) * float("inf")
    with pytest.raises(TrainingDiverged, match=r"at step 1: loss [0-9.]+, grad norm inf; .* a lower --lr \(now 0.01\)"):
        trainer.train_step(trainer._groups_for_step(0))
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_metrics_rows_are_strict_json(tmp_path):
    """A NaN or infinite figure is null (bare NaN is not JSON: strict readers refuse the file)."""
    from gft_train.metrics import MetricsLog, plot_metrics, strict_json

    log = MetricsLog(tmp_path, 0, True)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "entropy": 0.5}, 1)
    log.write({"step": 2, "loss": 1.0, "grad_norm": 2.0, "entropy": 0.4}, 2)
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "loss": None, "grad_norm": None, "entropy": 0.5}
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "training.png")  # a null is skipped, not drawn
    assert json.loads(strict_json({"kl": [float("nan"), 1.0]})) == {"kl": [None, 1.0]}


# ---- item 5: max_steps wins over num_epochs ------------------------------------------------


def test_max_steps_given_with_num_epochs_wins(s, tmp_path, capsys, monkeypatch):
    # 12 prompts, 4 a step: 1.5 epochs are ceil(18 / 4) = 5 steps
    assert _trainer(s, tmp_path / "a", num_epochs=1.5, max_steps=2).cfg.max_steps == 2
    assert _trainer(s, tmp_path / "b", num_epochs=1.5, max_steps=None).cfg.max_steps == 5
    assert config_mod.Config().resolved().max_steps == 100  # neither given: the default
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    assert "max_steps wins (as in transformers' Trainer)" in capsys.readouterr().out


# ---- item 6: answers -------------------------------------------------------------------------


def test_sft_needs_no_answer_and_a_scored_method_refuses_an_empty_one(s, tmp_path):
    trainer = _trainer(s, tmp_path / "sft", train_file=s["no_answer"])
    metrics = trainer.train_step(trainer._groups_for_step(0))
    assert math.isfinite(metrics["loss"]) and not any(k.startswith("reward/") for k in metrics)
    rows = [dict(r) for r in s["rows"][:4]]
    rows[2]["answer"] = " "
    bad = write_jsonl(rows, tmp_path / "empty.jsonl")
    with pytest.raises(DataError) as info:
        _trainer(s, tmp_path / "gft", method="gft", n_self=0, train_file=str(bad))
    assert str(info.value).startswith(f"{bad}: line 3: field 'answer': empty"), info.value
    with pytest.raises(DataError, match="line 1: field 'answer': missing"):
        _trainer(s, tmp_path / "grpo", method="gft", n_self=0, train_file=s["no_answer"])
    assert load_rows(bad, answers=False)[2].answer is None


# ---- item 10: data files as users have them --------------------------------------------------

GOOD = {"prompt": "1+1=", "answer": "2", "expert": "2"}


def test_line_numbers_are_the_files_lines_and_bad_bytes_name_theirs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join([json.dumps(GOOD), "", json.dumps(GOOD), "   ", "", json.dumps({**GOOD, "expert": ""})]) + "\n"
    )
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}: line 6: field 'expert': empty" and info.value.line == 6
    # a JSON string may hold U+2028 (str.splitlines would split the line there)
    path.write_text(json.dumps({**GOOD, "prompt": "1\u2028+1="}, ensure_ascii=False) + "\n")
    assert load_rows(path)[0].prompt == "1\u2028+1="
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\u00e9",'.encode("latin-1") + b"}\n")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path}: line 2: field '*': byte 0xe9 at column 16 is not UTF-8"), info.value


def test_json_arrays_compressed_files_and_csv_are_read(tmp_path):
    rows = [GOOD, {**GOOD, "prompt": "2+2=", "answer": "004", "expert": "4"}]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows, indent=2))
    assert [r.prompt for r in load_rows(array)] == ["1+1=", "2+2="]
    array.write_text(json.dumps([*rows, {"prompt": "x"}], indent=2))  # the third object starts on line 12
    with pytest.raises(DataError, match=r"a.json: line 12: field 'answer': missing"):
        load_rows(array)
    (tmp_path / "g.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    (tmp_path / "g.jsonl.bz2").write_bytes(bz2.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    for name in ("g.json.gz", "g.jsonl.bz2"):
        assert [r.answer for r in load_rows(tmp_path / name)] == ["2", "004"]
    with (tmp_path / "c.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "answer", "expert"])
        w.writeheader()
        w.writerows([*rows, {"prompt": "a\nb", "answer": "1", "expert": "1"}, {"prompt": "3+3=", "answer": "6"}])
    with pytest.raises(DataError, match=r"c.csv: line 6: field 'expert': missing"):  # (a quoted cell spans 2 lines)
        load_rows(tmp_path / "c.csv")
    (tmp_path / "c.csv").write_text("prompt,answer,expert\n1+1=,2,2\n2+2=,004,4\n")
    assert [(r.prompt, r.answer) for r in load_rows(tmp_path / "c.csv")] == [("1+1=", "2"), ("2+2=", "004")]


def test_yaml_errors_name_the_config_file_and_columns_may_be_a_mapping(s, tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    config_mod.add_arguments(p)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: 1e-3\nmax_steps: [3\n")
    with pytest.raises(ValueError, match=rf"{broken}: not valid YAML \(line 3"):
        config_mod.from_args(p.parse_args(["--config", str(broken)]))
    mapped = tmp_path / "mapped.yaml"
    mapped.write_text("columns:\n  prompt: question\n  expert: solution\n")
    cfg = config_mod.from_args(p.parse_args(["--config", str(mapped)]))
    assert cfg.columns == "prompt=question,expert=solution"
    data = write_jsonl([{"question": "1+1=", "answer": "2", "solution": "2"}], tmp_path / "q.jsonl")
    assert load_rows(data, cfg.columns)[0].expert == "2"


def test_a_reward_module_in_the_working_directory_is_imported(tmp_path, monkeypatch):
    """The gft-train command's sys.path holds its script's folder, not the working directory."""
    from gft_train.rewards import load_reward

    (tmp_path / "cwd_reward_30.py").write_text(
        "def r(prompts, completions, answers):\n    return [0.5] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_reward_30", raising=False)
    assert load_reward("cwd_reward_30:r")(["p"], ["c"], ["a"]) == [0.5]


def test_the_default_eval_k_is_what_eval_n_samples_can_report():
    """Left unset, eval_k is 1 and 4 where eval_n reaches them: `--eval-n 2` alone evaluates
    (pass@1), it is not refused for a k the user never asked for; an explicit k above eval_n is."""
    base = dict(model="m", train_file="t.jsonl", eval_file="e.jsonl")
    assert config_mod.Config(**base, eval_n=2).resolved().eval_k == [1]
    assert config_mod.Config(**base, eval_n=8).resolved().eval_k == [1, 4]
    with pytest.raises(ValueError, match=r"--eval_k must be k <= --eval_n \(2\)"):
        config_mod.Config(**base, eval_n=2, eval_k=[1, 4]).resolved()
