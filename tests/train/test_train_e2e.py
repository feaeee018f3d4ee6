"""gft_train end to end on the tiny model: the demo, two processes, kill and resume, bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gft_train.cli import main as cli_main
from gft_train.config import Config
from gft_train.data import DataError, load_rows
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl
from gft_train.groups import build_groups, save_groups
from gft_train.rewards import load_reward
from gft_train.rollout import TransformersEngine
from gft_train.trainer import load_model

pytestmark = pytest.mark.slow  # (tests/conftest.py: `pytest -m "not slow"` is the quick subset)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, prompt rows, and an offline groups file (expert + teacher + self-samples)."""
    d = tmp_path_factory.mktemp("train")
    model_dir = build_model(d / "model")
    splits = make_splits(seed=1, n_train=40, n_eval=8)
    train = write_jsonl(splits["train"], d / "train.jsonl")
    model, tok = load_model(str(model_dir))
    cfg = Config(method="gft", n_self=2, max_new_tokens=4).resolved()
    engine = TransformersEngine(model, tok, max_new_tokens=4)
    groups = build_groups(load_rows(train), cfg, engine, load_reward("math"), seed=0)
    save_groups(groups, d / "groups.jsonl")
    return dict(
        dir=d,
        model=model_dir,
        train=train,
        groups=d / "groups.jsonl",
        eval=write_jsonl(splits["eval_id"], d / "eval.jsonl"),
    )


def _train_args(s, out, *extra):
    return [
        "train",
        "--model",
        str(s["model"]),
        "--groups-file",
        str(s["groups"]),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--prompts-per-step",
        "4",
        "--micro-batch-size",
        "5",
        "--lr",
        "1e-3",
        "--max-length",
        "16",
        "--lr-scheduler",
        "linear",
        *extra,
    ]


def _weights(final: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def _run(args, env_extra=None, launcher=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = (launcher or [sys.executable, "-m"]) + ["gft_train.cli"] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_groups_have_the_paper_mix_and_standardized_advantages(setup):
    from gft_train.groups import load_groups

    groups = load_groups(setup["groups"])
    assert len(groups) == 40
    for g in groups:
        assert [r.source for r in g.responses] == ["expert"] + ["teacher"] * 3 + ["self"] * 2
        assert g.responses[0].reward == 1.0
        for r in g.responses:  # self-samples keep the ids the engine sampled; the rest are texts
            assert (r.token_ids is not None) == (r.source == "self")
            assert r.token_ids is None or r.truncated == (r.token_ids[-1] != 1)  # 1: <eos>, the end unless cut off
            assert r.token_ids is None or (len(r.token_ids) <= 4 and 1 not in r.token_ids[:-1])
        advs = [r.advantage for r in g.responses]
        assert abs(sum(advs)) < 1e-6  # standardized within the group


def test_two_processes_match_one_process(setup, tmp_path):
    one = _run(_train_args(setup, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
    ]
    two = _run(_train_args(setup, tmp_path / "two"), launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    for run, n in (("one", 1), ("two", 2)):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["processes"] == n
    _assert_same_weights(_weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final"), atol=2e-5)
    # and training moved the weights at all
    from safetensors.torch import load_file

    init = load_file(str(setup["model"] / "model.safetensors"))
    moved = max((init[k] - v).abs().max().item() for k, v in _weights(tmp_path / "one" / "final").items())
    assert moved > 1e-3


def test_killed_run_resumes_to_the_same_weights(setup, tmp_path):
    full = _run(_train_args(setup, tmp_path / "full", "--save-every", "2"))
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _run(_train_args(setup, tmp_path / "crash", "--save-every", "2"), env_extra={"GFT_FAULT_AT_STEP": "5"})
    assert crashed.returncode == -9  # SIGKILL in the middle of the run
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]
    assert not (tmp_path / "crash" / "final").exists()  # nothing left as if complete
    again = _run(_train_args(setup, tmp_path / "crash", "--save-every", "2"))
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to overwrite silently
    resumed = _run(_train_args(setup, tmp_path / "crash", "--save-every", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    _assert_same_weights(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "crash" / "final"), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6]


def test_online_training_with_rollouts_and_eval(setup, tmp_path, capsys, monkeypatch):
    import gft_train.step

    seen = []  # what the trainer encodes: sampled ids for self-samples, texts for the rest
    encode = gft_train.step.encode
    monkeypatch.setattr(gft_train.step, "encode", lambda tok, items, n: seen.extend(items) or encode(tok, items, n))
    out = tmp_path / "online"
    cli_main(
        [
            "train",
            "--model",
            str(setup["model"]),
            "--train-file",
            str(setup["train"]),
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--prompts-per-step",
            "3",
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
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    for key in (
        "dcr/rectified_frac",
        "entropy",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "reward/self_mean",
        "reward/teacher_mean",
        "groups/zero_variance_frac",
        "completions/self_mean_chars",
        "completions/self_mean_tokens",
        "completions/self_truncated_frac",
    ):
        assert key in metrics[-1], key
    assert (out / "training.png").exists() and (out / "final" / "config.json").exists()
    assert list((out / "tensorboard").iterdir())
    # online by default: each step sampled its own 3 prompts x 2 with the current weights
    assert not (out / "groups.jsonl").exists()
    sampled = [r for _, r, _ in seen if isinstance(r, list)]
    assert len(seen) == 2 * 3 * (1 + 3 + 2) and len(sampled) == 2 * 3 * 2
    _, tok = load_model(str(setup["model"]))
    eos = tok.eos_token_id
    assert all(len(ids) <= 4 and eos not in ids[:-1] and (len(ids) == 4 or ids[-1] == eos) for ids in sampled)
    capsys.readouterr()
    cli_main(
        [
            "eval",
            "--model",
            str(out / "final"),
            "--eval-file",
            str(setup["eval"]),
            "--eval-n",
            "3",
            "--eval-k",
            "1,3",
            "--max-new-tokens",
            "4",
            "--engine",
            "transformers",
            "--base-model",
            str(setup["model"]),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["pass@1"] <= result["pass@3"] <= 1 and 0 <= result["greedy_pass@1"] <= 1
    assert 0 <= result["distinct_correct"] <= 3
    assert result["kl_to_base"] >= 0 and result["kl_base_model"] >= 0


def test_cli_eval_prints_only_json_on_stdout(setup):
    """`gft-train eval ... | jq` works: in a fresh process stdout carries the JSON alone (progress
    bars and library warnings go to stderr)."""
    proc = _run(
        [
            "eval",
            "--model",
            str(setup["model"]),
            "--eval-file",
            str(setup["eval"]),
            "--eval-n",
            "2",
            "--max-new-tokens",
            "4",
            "--engine",
            "transformers",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert 0 <= result["pass@1"] <= 1 and "per_prompt" not in result


def test_bad_data_row_stops_the_run_and_leaves_no_final(setup, tmp_path):
    rows = [json.loads(line) for line in Path(setup["train"]).read_text().splitlines()[:5]]
    rows[3]["expert"] = 42
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run(
        [
            "train",
            "--model",
            str(setup["model"]),
            "--train-file",
            str(bad),
            "--output-dir",
            str(tmp_path / "o"),
            "--max-steps",
            "1",
        ]
    )
    assert proc.returncode != 0
    assert f"{bad}: line 4: field 'expert': expected a string" in proc.stderr
    assert not (tmp_path / "o" / "final").exists()


def test_missing_model_and_unknown_method_are_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        cli_main(
            ["train", "--model", "no/such/model", "--train-file", str(setup["train"]), "--output-dir", str(tmp_path)]
        )
    with pytest.raises(ValueError, match="method must be one of"):
        cli_main(["train", "--method", "ppo", "--model", str(setup["model"]), "--train-file", str(setup["train"])])
    with pytest.raises(DataError, match="teachers"):
        rows = [json.loads(line) for line in Path(setup["train"]).read_text().splitlines()[:3]]
        rows[1]["teachers"] = []
        p = tmp_path / "t.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cli_main(
            [
                "build-groups",
                "--model",
                str(setup["model"]),
                "--train-file",
                str(p),
                "--n-self",
                "0",
                "--groups-file",
                str(tmp_path / "g.jsonl"),
            ]
        )
    assert not (tmp_path / "g.jsonl").exists()


def test_demo_prints_the_same_table_twice(tmp_path):
    """Deterministic on one machine: a second run in the same folder starts afresh (its own
    folders cleared) and prints the same table."""
    from gft_train.demo.run import run_demo

    run_demo(tmp_path / "demo", quick=True)
    first = (tmp_path / "demo" / "results.txt").read_text()
    run_demo(tmp_path / "demo", quick=True)
    assert (tmp_path / "demo" / "results.txt").read_text() == first


def test_demo_names_its_regime_and_runs_another_on_request(tmp_path, capsys):
    """The demo says which regime it shows and where the study's per-regime verdicts are; --regime
    competent pre-trains the base on correct sums (the paper's regime) and trains at that regime's rates."""
    from gft_train.cli import main as cli
    from gft_train.demo.run import RATES

    cli(["demo", "--quick", "--regime", "competent", "--output-dir", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert "[demo] regime competent: the paper's regime" in printed and "docs/reproduction.md" in printed
    result = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert result["regime"] == "competent" and result["rates"] == dict(zip(("sft", "gft"), RATES["competent"]))
    pretrain = [json.loads(x) for x in (tmp_path / "demo" / "data" / "pretrain.jsonl").read_text().splitlines()]
    sums = [r for r in pretrain if r["prompt"].count("+") == 2]
    assert sums and all(r["expert"].rsplit("=", 1)[1] == r["answer"] for r in sums)  # carried: right
    with pytest.raises(SystemExit):
        cli(["demo", "--quick", "--regime", "expert"])
    assert "invalid choice: 'expert'" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    from gft_train.demo.run import SPLITS, run_demo

    result = run_demo(tmp_path / "demo", quick=True)
    printed = capsys.readouterr().out
    assert "base pass@1" in printed and "SFT pass@1" in printed and "GFT pass@1" in printed
    assert set(result["results"]) == {"base", "SFT", "GFT"}
    for model in result["results"].values():
        for split in SPLITS:
            assert {"pass@1", "greedy_pass@1", "pass@2", "distinct_correct"} <= set(model[split])
    assert "greedy" in printed and "KL(base || GFT)" in printed and result["results"]["GFT"]["kl_base_model"] >= 0
    for method in ("sft", "gft"):
        assert (tmp_path / "demo" / "runs" / f"{method}-seed0" / "training.png").exists()
        metrics = (tmp_path / "demo" / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in metrics]
        assert losses and all(abs(x) < 1e3 for x in losses)
