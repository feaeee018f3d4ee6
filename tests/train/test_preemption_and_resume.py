"""gft-train's output folder over a run's life (issue 30): a start that fails before its first step
blocks nothing, SIGTERM / SIGINT end a run with a checkpoint it resumes from to the same weights,
a resume compares meaning (resolved paths, data contents), and several processes speak once.
SFT runs of a few steps on the demo's tiny model, in process where they can."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gft_train.cli import main as cli_main
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    rows = make_splits(seed=3, n_train=12, n_eval=4)
    return dict(
        dir=d,
        model=build_model(d / "model", hidden_size=64, layers=1),
        train=write_jsonl(rows["train"], d / "train.jsonl"),
    )


def _sft(model, train, out, *extra):
    return [
        "train",
        "--method",
        "sft",
        "--model",
        str(model),
        "--train-file",
        str(train),
        "--output-dir",
        str(out),
        "--max-steps",
        "5",
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
        "--report-to",
        "none",
        *extra,
    ]


def _run(args, env=None, launcher=None, drop=()):
    """The command in fresh processes (``launcher``: several): the completed process."""
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [*(launcher or [sys.executable, "-m"]), "gft_train.cli", *args],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _weights(final: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> float:
    """The largest difference between the weights of two saved models."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# ---- item 7: a failed start blocks nothing ----------------------------------------------------


def test_a_start_whose_reward_fails_leaves_the_folder_to_the_corrected_rerun(s, tmp_path, monkeypatch):
    """The reward returns one score too few: the run fails building the first step's groups (after
    trackers started); the corrected rerun into the same folder starts without
    --overwrite-output-dir. A folder whose run completed a step is still refused."""
    (tmp_path / "short_reward.py").write_text(
        "def score(prompts, completions, answers):\n    return [1.0] * (len(completions) - 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="returned 11 rewards for 12 completions"):
        cli_main(_sft(s["model"], s["train"], out, "--reward", "short_reward:score", "--report-to", "tensorboard"))
    assert not (out / "gft_config.yaml").exists()  # no claim: no step was done
    assert (out / "tensorboard").is_dir()  # (the trackers had started: the rerun clears their events)
    cli_main(_sft(s["model"], s["train"], out, "--max-steps", "1"))
    assert (out / "final" / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="already holds a run"):
        cli_main(_sft(s["model"], s["train"], out, "--max-steps", "1"))


def test_a_missing_rollout_engine_stops_before_anything_is_written(s, tmp_path):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    out = tmp_path / "run"
    args = _sft(s["model"], s["train"], out, "--n-self", "2", "--max-new-tokens", "2")
    with pytest.raises(ValueError, match="--engine vllm: vllm is not installed"):
        cli_main([*args, "--engine", "vllm", "--report-to", "tensorboard"])
    assert not out.exists() or not any(out.iterdir())
    cli_main([*args, "--engine", "transformers", "--max-steps", "1"])
    assert (out / "final").is_dir()


@pytest.mark.slow
def test_a_loss_backend_this_device_lacks_stops_before_anything_is_written(s, tmp_path):
    """--loss-backend triton on a CPU (no Triton interpreter): one line before the model is
    trained, and the folder stays free for the corrected rerun."""
    out = tmp_path / "run"
    bad = _run(
        _sft(s["model"], s["train"], out, "--loss-backend", "triton", "--max-steps", "1"), drop=("TRITON_INTERPRET",)
    )
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("gft-train: error: --loss-backend triton: "), bad.stderr
    assert not out.exists() or not any(out.iterdir())
    cli_main(_sft(s["model"], s["train"], out, "--max-steps", "1"))


# ---- item 8: preemption loses nothing ---------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_resumed_run_reaches_the_same_weights(s, tmp_path):
    """SIGTERM (a scheduler's preemption) under the default save_every 0: the step finishes, a
    checkpoint is written, one line says how to resume, the exit is 128 + 15; --resume then ends at
    the weights of the run that was never stopped."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    cli_main(_sft(s["model"], s["train"], whole))
    proc = _run(_sft(s["model"], s["train"], stopped), env={"GFT_FAULT_AT_STEP": "3", "GFT_FAULT_SIGNAL": "TERM"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"gft-train: stopped by SIGTERM after step 3 of 5; checkpoint {stopped / 'checkpoints' / 'step-3'}; "
        "to continue, run the same command with --resume"
    ), last
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-3"]
    assert not (stopped / "final").exists()
    cli_main(_sft(s["model"], s["train"], stopped, "--resume"))
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert _same_weights(whole / "final", stopped / "final") <= 1e-6


def test_sigint_stops_at_the_step_boundary_with_a_checkpoint(s, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT, here sent by the run to itself before step 2) ends the run after step 2
    with its checkpoint, as TrainingStopped (exit status 130 from the command line), and the
    handlers are the caller's again afterwards."""
    from gft_train.trainer import TrainingStopped

    monkeypatch.setenv("GFT_FAULT_AT_STEP", "2")
    monkeypatch.setenv("GFT_FAULT_SIGNAL", "INT")
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped, match="stopped by SIGINT after step 2 of 5") as info:
        cli_main(_sft(s["model"], s["train"], out))
    assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_resume_takes_a_chosen_checkpoint_by_name_or_path(s, tmp_path):
    """--resume step-2 goes back to that checkpoint (the later ones and final/ belong to the course
    abandoned, and are removed) and reaches the same weights again; a path works alike; a name that
    is no complete checkpoint is refused naming the ones there are."""
    out = tmp_path / "run"
    cli_main(_sft(s["model"], s["train"], out, "--max-steps", "4", "--save-every", "1"))
    first = _weights(out / "final")
    with pytest.raises(
        ValueError, match=r"--resume step-9: not a complete checkpoint .* step-1, step-2, step-3, step-4"
    ):
        cli_main(_sft(s["model"], s["train"], out, "--max-steps", "4", "--save-every", "1", "--resume", "step-9"))
    with pytest.raises(ValueError, match="max_steps 1 is below the checkpoint's step 2"):  # refused, nothing removed
        cli_main(_sft(s["model"], s["train"], out, "--max-steps", "1", "--save-every", "1", "--resume", "step-2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3", "step-4"]
    cli_main(_sft(s["model"], s["train"], out, "--max-steps", "4", "--save-every", "1", "--resume", "step-2"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    again = _weights(out / "final")
    assert max((first[k] - again[k]).abs().max().item() for k in first) <= 1e-6
    # a path: another output_dir continues from this run's step-3
    branch = tmp_path / "branch"
    cli_main(_sft(s["model"], s["train"], branch, "--max-steps", "4", "--resume", str(out / "checkpoints" / "step-3")))
    assert [json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()] == [4]
    assert _same_weights(out / "final", branch / "final") <= 1e-6


# ---- item 9: resume compares meaning, not text ------------------------------------------------


def test_resume_accepts_paths_spelled_otherwise_and_refuses_changed_data(s, tmp_path, monkeypatch):
    """The model and data named relative to the directory after absolute paths, and another
    micro-batch size (the same math): resumed. The data file's contents changed under its name:
    refused, naming the file. A checkpoint written before inputs were kept still resumes."""
    out = tmp_path / "run"
    train = tmp_path / "train.jsonl"
    train.write_bytes(Path(s["train"]).read_bytes())
    cli_main(_sft(s["model"], train, out, "--max-steps", "2", "--save-every", "1"))
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(s["model"], tmp_path)
    cli_main(
        _sft(
            model, "./train.jsonl", out, "--max-steps", "3", "--save-every", "1", "--micro-batch-size", "2", "--resume"
        )
    )
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    rows = train.read_text().splitlines()
    train.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # the same name, other contents
    with pytest.raises(ValueError, match=r"--resume: train_file train.jsonl has changed since the run read it"):
        cli_main(_sft(model, "train.jsonl", out, "--max-steps", "4", "--save-every", "1", "--resume"))
    state = out / "checkpoints" / "step-3" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "inputs"}))
    cli_main(_sft(model, "train.jsonl", out, "--max-steps", "4", "--save-every", "1", "--resume"))
    assert (out / "final").is_dir()


def test_resumable_fields_are_the_ones_that_leave_the_math_alone():
    from gft_train import config as config_mod

    saved = config_mod.Config(model="m", train_file="t.jsonl").resolved()
    values = {k: getattr(saved, k) for k in config_mod.PATH_FIELDS}
    base = dict(values, resume="latest", save_every=3, eval_every=0, report_to="none")
    now = config_mod.Config(**base, micro_batch_size=2, gradient_checkpointing=True).resolved()
    import dataclasses

    assert config_mod.changed_fields(dataclasses.asdict(saved), now) == {}
    now = config_mod.Config(**base, lr=2e-5).resolved()
    assert config_mod.changed_fields(dataclasses.asdict(saved), now) == {"lr": (1e-5, 2e-5)}


# ---- items 8 and 11 under two processes -------------------------------------------------------


@pytest.mark.slow
def test_two_processes_stop_together_and_speak_once(s, tmp_path):
    """SIGTERM reaches only the second process: both stop after the same step with one
    checkpoint and one line; a refused resume says its error once; the resume's `final model:`
    is said once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
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
    out = tmp_path / "two"
    args = _sft(s["model"], s["train"], out, "--max-steps", "4")
    env = {"GFT_FAULT_AT_STEP": "2", "GFT_FAULT_SIGNAL": "TERM", "GFT_FAULT_RANK": "1"}
    stopped = _run(args, env=env, launcher=launcher)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    said = [line for line in stopped.stderr.splitlines() if line.startswith("gft-train:")]
    assert said == [
        f"gft-train: stopped by SIGTERM (on another process) after step 2 of 4; checkpoint "
        f"{out / 'checkpoints' / 'step-2'}; to continue, run the same command with --resume"
    ], stopped.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    refused = _run([*args, "--resume", "--lr", "0.5"], launcher=launcher)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("gft-train:")]
    assert refused.returncode != 0 and len(errors) == 1 and "lr: 0.001 -> 0.5" in errors[0], refused.stderr[-3000:]
    resumed = _run([*args, "--resume"], launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("final model:") == 1, resumed.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    cli_main(_sft(s["model"], s["train"], tmp_path / "one", "--max-steps", "4"))  # never stopped, one process
    assert _same_weights(tmp_path / "one" / "final", out / "final") <= 2e-5
