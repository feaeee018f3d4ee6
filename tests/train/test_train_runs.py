"""gft-train on real runs (issue 22): nothing trained is lost, a resume is the same run, every bad
input ends in one line. SFT runs of a few steps on the demo's tiny model, in process where they can."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gft_train.cli import main as cli_main
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    rows = make_splits(seed=2, n_train=12, n_eval=4)
    return dict(
        dir=d,
        model=build_model(d / "model", hidden_size=64, layers=1),
        train=write_jsonl(rows["train"], d / "train.jsonl"),
        eval=write_jsonl(rows["eval_id"], d / "eval.jsonl"),
    )


def _sft(s, out, *extra):
    return [
        "train",
        "--method",
        "sft",
        "--model",
        str(s["model"]),
        "--train-file",
        str(s["train"]),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--prompts-per-step",
        "4",
        "--micro-batch-size",
        "4",
        "--lr",
        "1e-3",
        "--max-length",
        "16",
        "--lr-scheduler",
        "linear",
        *extra,
    ]


def _cli(args, **env):
    """The command in a fresh process: (exit status, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gft_train.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stderr


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def test_a_finished_run_is_not_overwritten_without_the_flag(s, tmp_path):
    """Defect 2: training twice into one output_dir replaced final/ and metrics.jsonl."""
    out = tmp_path / "run"
    cli_main(_sft(s, out))
    before = _files(out)
    with pytest.raises(FileExistsError, match="--overwrite-output-dir"):
        cli_main(_sft(s, out, "--lr", "5e-3"))
    with pytest.raises(FileExistsError, match="no complete checkpoint"):  # nothing to resume: still refused
        cli_main(_sft(s, out, "--resume"))
    assert _files(out) == before
    cli_main(_sft(s, out, "--lr", "5e-3", "--overwrite-output-dir"))
    assert (out / "final" / "model.safetensors").read_bytes() != before["final/model.safetensors"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1  # one run's events


def test_resume_refuses_a_changed_configuration_and_continues_from_the_last_step(s, tmp_path):
    """Defect 3: a resume with another lr and method rolled back to an older checkpoint, overwrote
    final/ and saved the new lr while the schedule kept the old one."""
    out = tmp_path / "run"
    cli_main(_sft(s, out, "--save-every", "2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]  # the last step too
    before = _files(out)
    with pytest.raises(ValueError) as info:
        cli_main(_sft(s, out, "--save-every", "2", "--resume", "--lr", "0.5", "--method", "gft", "--max-steps", "5"))
    msg = str(info.value)
    assert "lr: 0.001 -> 0.5" in msg and "method: 'sft' -> 'gft'" in msg and "max_steps" not in msg.split(";")[0], msg
    assert _files(out) == before
    cli_main(_sft(s, out, "--save-every", "2", "--resume", "--max-steps", "5"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3", "step-4", "step-5"]
    import yaml

    saved = yaml.safe_load((out / "final" / "gft_config.yaml").read_text())
    assert (saved["max_steps"], saved["lr"]) == (5, 1e-3)  # what was used


def test_a_resume_that_extends_a_finished_run_trains_at_the_new_schedules_rate(s, tmp_path):
    """A finished 3-step run (linear schedule: its rate ends at 0), resumed with max_steps 5: the
    optimizer came back at 0, so the first added step trained nothing; it is the new schedule's
    rate at step 3, 1e-3 x (5 - 3) / 5."""
    from gft_train.config import Config
    from gft_train.trainer import Trainer

    out = tmp_path / "run"
    cli_main(_sft(s, out, "--save-every", "1"))
    cfg = Config(
        method="sft",
        model=str(s["model"]),
        train_file=str(s["train"]),
        output_dir=str(out),
        max_steps=5,
        prompts_per_step=4,
        micro_batch_size=4,
        lr=1e-3,
        max_length=16,
        lr_scheduler="linear",
        save_every=1,
        resume=True,
    )
    trainer = Trainer(cfg)
    trainer.maybe_resume()
    assert trainer.step == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 5)


@pytest.mark.slow
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(s, tmp_path):
    """Defect 8: every error was a 17-30 line traceback."""
    rows = [json.loads(line) for line in Path(s["train"]).read_text().splitlines()[:4]]
    rows[2]["answer"] = [7]
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    args = _sft(s, tmp_path / "o")[:]
    args[args.index(str(s["train"]))] = str(bad)
    code, err = _cli(args)
    assert (
        code == 1
        and err.strip().splitlines()[-1]
        == f"gft-train: error: {bad}: line 3: field 'answer': expected a string or a number, got list: [7]"
    ), err
    assert "Traceback" not in err and len([x for x in err.splitlines() if "error" in x]) == 1, err
    code, err = _cli(args + ["--debug"])
    assert code == 1 and "Traceback" in err and "DataError" in err
    code, err = _cli(args, GFT_DEBUG="1")
    assert code == 1 and "Traceback" in err
    code, err = _cli(["train", "--model", str(tmp_path / "nope"), "--train-file", str(bad)])
    assert code == 1 and "Traceback" not in err and f"model path '{tmp_path / 'nope'}'" in err, err
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gft-train"] == "gft_train.cli:cli"  # the installed command prints the one line too


def _scalar_steps(logdir, tag="loss"):
    """The steps of ``tag`` as TensorBoard shows them (its reader applies a resumed run's purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
    steps = []
    for run in sorted(runs):
        acc = EventAccumulator(str(run))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


@pytest.mark.slow
def test_tensorboard_has_each_step_once_after_a_killed_run_resumes(s, tmp_path):
    """Defect 4: metrics.jsonl was trimmed to the checkpoint on resume, the event files were not."""
    out = tmp_path / "run"
    args = _sft(s, out, "--save-every", "2", "--max-steps", "6")
    proc = subprocess.run(
        [sys.executable, "-m", "gft_train.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GFT_FAULT_AT_STEP": "4"},
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL before step 4: checkpoint at 2, events to 3
    assert _scalar_steps(out / "tensorboard") == [1, 2, 3]
    cli_main(args + ["--resume"])
    assert _scalar_steps(out / "tensorboard") == [1, 2, 3, 4, 5, 6]


def _rows(s, n=None):
    return [json.loads(line) for line in Path(s["train"]).read_text().splitlines()][:n]


def _trainer(s, tmp_path, **kw):
    from gft_train.config import Config
    from gft_train.trainer import Trainer

    base = dict(
        model=str(s["model"]),
        train_file=str(s["train"]),
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        prompts_per_step=4,
        micro_batch_size=4,
        max_length=16,
        n_self=2,
        max_new_tokens=4,
        engine="transformers",
    )
    return Trainer(Config(**{**base, **kw}))


def test_every_row_is_checked_for_teachers_before_the_first_step(s, tmp_path):
    """Defect 5: an online run met a row with too few teachers only when a step reached it."""
    from gft_train.data import DataError

    rows = _rows(s)
    rows[9]["teachers"] = rows[9]["teachers"][:1]
    rows[10]["teachers"] = []
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as info:
        _trainer(s, tmp_path, train_file=str(bad))
    assert f"{bad}: line 10: field 'teachers': has 1 teacher responses, the group mix needs 3 (2 rows in all)" in str(
        info.value
    )
    assert not (tmp_path / "o").exists()


def test_runs_that_train_on_nothing_warn_with_counts_or_stop(s, tmp_path):
    """Defect 6: prompts longer than max_length, and groups of one, trained on nothing silently."""
    from gft_train.groups import Group, Response, save_groups

    rows = _rows(s)
    for r in rows[:3]:
        r["prompt"] = "1+2+3+4+5+6+7+8+9=" + r["prompt"]  # 18 characters more: over max_length 16
    long = write_jsonl(rows, tmp_path / "long.jsonl")
    with pytest.warns(UserWarning, match=f"3 of 12 prompts of {long} are max_length \\(16\\) tokens or longer"):
        _trainer(s, tmp_path, train_file=str(long))
    with pytest.raises(ValueError, match="every prompt .* max_length .* nothing would train"):
        _trainer(s, tmp_path, train_file=str(long), max_length=4)
    with pytest.raises(ValueError, match="has one response .* advantage is 0, nothing would train"):
        _trainer(s, tmp_path, n_teacher=0, n_self=0)
    groups = [Group("1+2=", "3", [Response("3", "expert")] + [Response("4", "teacher")] * (i > 0)) for i in range(4)]
    save_groups(groups, tmp_path / "g.jsonl")
    with pytest.warns(UserWarning, match="1 of 4 groups .* have one response"):
        _trainer(s, tmp_path, train_file="", groups_file=str(tmp_path / "g.jsonl"), refresh_every=0)
    assert not (tmp_path / "o").exists()


def test_a_groups_file_from_another_tokenizer_is_refused_by_row_and_field(s, tmp_path):
    """Defect 7: ids of another vocabulary failed in the forward with `IndexError: index out of range`."""
    from gft_train.config import Config
    from gft_train.data import DataError, load_rows
    from gft_train.groups import build_groups, load_groups, save_groups
    from gft_train.rewards import load_reward
    from gft_train.rollout import TransformersEngine
    from gft_train.trainer import load_model

    model, tok = load_model(str(s["model"]))
    cfg = Config(n_self=1, max_new_tokens=3).resolved()
    groups = build_groups(
        load_rows(s["train"])[:4], cfg, TransformersEngine(model, tok, max_new_tokens=3), load_reward("math")
    )
    save_groups(groups, tmp_path / "g.jsonl")
    assert {g.tokenizer for g in load_groups(tmp_path / "g.jsonl")} == {tok.name_or_path}  # stored with them
    groups[2].responses[-1].token_ids = [3, 50000]
    groups[2].tokenizer = "some/other-tokenizer"
    save_groups(groups, tmp_path / "g.jsonl")
    with pytest.raises(DataError) as info:
        _trainer(s, tmp_path, train_file="", groups_file=str(tmp_path / "g.jsonl"), refresh_every=0)
    msg = str(info.value)
    assert f"{tmp_path / 'g.jsonl'}: row 2: field 'responses[4].token_ids': token id 50000 is outside" in msg, msg
    assert "'some/other-tokenizer'" in msg


def test_prompts_per_step_above_the_data_is_said(s, tmp_path):
    """Defect 9: a step larger than the data repeated prompts within the step, silently."""
    with pytest.warns(UserWarning, match=f"prompts_per_step 20 is more than the 12 prompts of {s['train']}"):
        _trainer(s, tmp_path, prompts_per_step=20)


def test_the_bar_names_its_fields_and_the_plot_gives_each_quantity_its_panel(s, tmp_path, capsys):
    """Defect 9 (and the demo's bar): SFT's bar showed `reward=nan`, GFT's the self-samples' mean
    alone as `reward`; grad norm and entropy shared one axis."""
    from gft_train.trainer import plot_metrics

    cli_main(_sft(s, tmp_path / "sft", "--max-steps", "1"))
    bar = capsys.readouterr().err
    assert "loss=" in bar and "token_acc=" in bar and "reward" not in bar, bar
    cli_main(
        [
            "train",
            "--model",
            str(s["model"]),
            "--train-file",
            str(s["train"]),
            "--output-dir",
            str(tmp_path / "gft"),
            "--max-steps",
            "1",
            "--prompts-per-step",
            "2",
            "--n-self",
            "2",
            "--max-new-tokens",
            "4",
            "--max-length",
            "16",
            "--engine",
            "transformers",
        ]
    )
    bar = capsys.readouterr().err
    assert all(f"{k}_reward=" in bar for k in ("expert", "teacher", "self")) and " reward=" not in bar, bar
    panels = dict(plot_metrics(tmp_path / "gft" / "metrics.jsonl", tmp_path / "p.png"))
    assert [t for t, keys in panels.items() if "grad_norm" in keys] != [
        t for t, keys in panels.items() if "entropy" in keys
    ]
    assert all(len(keys) == 1 for t, keys in panels.items() if "grad_norm" in keys or "entropy" in keys)


def test_trains_from_chat_messages_in_trl_columns_with_a_mapping(s, tmp_path):
    """A chat-format JSONL (messages through the tokenizer's chat template), TRL's `completion`
    column and the file's own column names, end to end."""
    import shutil

    from transformers import AutoTokenizer

    model = shutil.copytree(s["model"], tmp_path / "chat-model")
    tok = AutoTokenizer.from_pretrained(model)
    # the assistant turn follows the generation prompt "*" as it is rendered (render.render refuses
    # a template that renders the conversation otherwise)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}*{{ m['content'] }}"
        "{% else %}({{ m['content'] }}){% endif %}{% endfor %}{% if add_generation_prompt %}*{% endif %}"
    )
    tok.save_pretrained(model)
    rows = [
        {
            "question": [{"role": "user", "content": r["prompt"]}],
            "gold": r["answer"],
            "completion": [{"role": "assistant", "content": r["expert"]}],
        }
        for r in _rows(s)
    ]
    data = write_jsonl(rows, tmp_path / "chat.jsonl")
    args = _sft(
        s, tmp_path / "o", "--model", str(model), "--train-file", str(data), "--columns", "prompt=question,answer=gold"
    )
    cli_main(args)
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["tokens"] > 0 for m in metrics)
    plain = write_jsonl(rows, tmp_path / "plain.jsonl")  # the same data, a model without a chat template
    with pytest.raises(Exception, match=f"{plain}: line 1: field 'prompt': chat messages need a tokenizer with a chat"):
        cli_main(_sft(s, tmp_path / "p", "--train-file", str(plain), "--columns", "prompt=question,answer=gold"))


def test_evaluation_during_training_is_logged_and_leaves_the_training_alone(s, tmp_path):
    """eval_every on eval_file: eval/* metrics at every N steps and the last, in metrics.jsonl and
    TensorBoard; the same weights as a run without evaluation (its sampling has its own RNG)."""
    from safetensors.torch import load_file

    def gft(out, *extra):
        return [
            "train",
            "--model",
            str(s["model"]),
            "--train-file",
            str(s["train"]),
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--prompts-per-step",
            "2",
            "--n-self",
            "2",
            "--max-new-tokens",
            "4",
            "--max-length",
            "16",
            "--engine",
            "transformers",
            "--lr",
            "1e-2",
            *extra,
        ]

    cli_main(gft(tmp_path / "plain"))
    cli_main(
        gft(tmp_path / "eval", "--eval-every", "2", "--eval-file", str(s["eval"]), "--eval-n", "2", "--eval-k", "2")
    )
    rows = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/pass@1" in r for r in rows] == [False, True, True]
    assert all(0 <= rows[-1][k] <= 1 for k in ("eval/pass@1", "eval/pass@2", "eval/greedy_pass@1"))
    assert _scalar_steps(tmp_path / "eval" / "tensorboard", "eval/pass@1") == [2, 3]
    a, b = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("plain", "eval"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="eval_every needs eval_file"):
        cli_main(gft(tmp_path / "x", "--eval-every", "2"))


def test_checkpoint_rotation_keeps_the_newest_and_resumes_from_them(s, tmp_path):
    out = tmp_path / "run"
    cli_main(_sft(s, out, "--max-steps", "5", "--save-every", "1", "--save-total-limit", "2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5"]
    cli_main(_sft(s, out, "--max-steps", "6", "--save-every", "1", "--save-total-limit", "2", "--resume"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5", "step-6"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_num_epochs_sets_the_steps_from_the_data(s, tmp_path):
    import yaml

    out = tmp_path / "run"
    args = _sft(s, out, "--num-epochs", "1.5")
    del args[args.index("--max-steps") : args.index("--max-steps") + 2]  # a given max_steps would win
    cli_main(args)  # 12 prompts, 4 a step: ceil(18 / 4) = 5 steps
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    assert yaml.safe_load((out / "final" / "gft_config.yaml").read_text())["max_steps"] == 5
