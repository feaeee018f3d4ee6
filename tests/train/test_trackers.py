"""Trackers through accelerate (issue 22): ``report_to`` picks them, each step's metrics reach every
one through ``Accelerator.log`` (once per step, also after a resume), and a tracker that is not
installed stops the run before anything is trained, in one line naming it."""

import json

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers, register_tracker_class

from gft_train.cli import main as cli_main
from gft_train.demo.model import build_model
from gft_train.demo.task import make_splits, write_jsonl
from gft_train.trackers import tracker_names

LOGGED: list = []  # (event, payload) of every Recording tracker, in order


class Recording(GeneralTracker):
    """A tracker that keeps what accelerate hands it (registered like a user's own tracker)."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self, run_name, **kwargs):
        super().__init__()
        self.run_name = run_name

    @property
    def tracker(self):
        return self

    def start(self):
        LOGGED.append(("start", self.run_name))

    def store_init_configuration(self, values):
        LOGGED.append(("config", dict(values)))

    def log(self, values, step=None, **kwargs):
        LOGGED.append(("log", step, dict(values)))

    def finish(self):
        LOGGED.append(("finish", None))


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("trk")
    rows = make_splits(seed=2, n_train=12, n_eval=4)
    return dict(
        model=build_model(d / "model", hidden_size=64, layers=1), train=write_jsonl(rows["train"], d / "t.jsonl")
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
        *extra,
    ]


def test_report_to_names_are_checked_up_front():
    assert tracker_names("none") == [] and tracker_names("") == []
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names("all") == [str(t) for t in get_available_trackers()]
    with pytest.raises(ValueError, match="report_to: unknown tracker 'tensorbord'; accelerate knows"):
        tracker_names("tensorbord")
    with pytest.raises(ValueError, match="'none' stands alone"):
        tracker_names("tensorboard,none")
    missing = [n for n in ("wandb", "mlflow", "comet_ml", "aim") if n not in [str(t) for t in get_available_trackers()]]
    if missing:
        with pytest.raises(
            ValueError, match=f"report_to: the tracker '{missing[0]}' is not installed \\(pip install {missing[0]}\\)"
        ):
            tracker_names(f"tensorboard,{missing[0]}")


def test_an_uninstalled_tracker_stops_the_run_before_it_starts(s, tmp_path):
    missing = next(
        (n for n in ("wandb", "mlflow", "comet_ml", "aim") if n not in [str(t) for t in get_available_trackers()]), None
    )
    if missing is None:
        pytest.skip("every tracker tried is installed")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"the tracker '{missing}' is not installed"):
        cli_main(_sft(s, out, "--report-to", missing))
    assert not out.exists()  # nothing written, nothing trained


def test_each_step_reaches_the_trackers_once_also_after_a_resume(s, tmp_path):
    if "recording" not in LOGGER_TYPE_TO_CLASS:
        register_tracker_class(Recording)
    LOGGED.clear()
    out = tmp_path / "run"
    cli_main(_sft(s, out, "--report-to", "recording", "--save-every", "2"))
    assert LOGGED[0] == ("start", "gft-train") and LOGGED[1][0] == "config" and LOGGED[1][1]["lr"] == 1e-3
    logs = [e for e in LOGGED if e[0] == "log"]
    assert [step for _, step, _ in logs] == [1, 2, 3] and LOGGED[-1] == ("finish", None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for (_, _step, values), row in zip(logs, rows):  # what metrics.jsonl says, its finite numbers
        assert values == {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    assert not (out / "tensorboard").exists()  # only what report_to names
    LOGGED.clear()
    cli_main(_sft(s, out, "--report-to", "recording", "--save-every", "2", "--resume", "--max-steps", "4"))
    assert [e[1] for e in LOGGED if e[0] == "log"] == [4]


def test_report_to_none_writes_no_tracker_files(s, tmp_path):
    out = tmp_path / "run"
    cli_main(_sft(s, out, "--report-to", "none", "--max-steps", "1"))
    assert (out / "final").is_dir() and not (out / "tensorboard").exists()
