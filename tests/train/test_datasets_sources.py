"""``datasets`` names and local dataset directories as train/eval sources (issue 22): a directory
saved by ``datasets.save_to_disk`` (a Dataset, or a DatasetDict's split), a folder of .jsonl/.parquet
files (split by their names as ``datasets`` reads a folder), a Hub name with split and config; the
same row checks, errors naming the dataset (directory, file or name[split]), the row and the field."""

import json

import datasets
import pytest

from gft_train.cli import main as cli_main
from gft_train.data import DataError, load_rows

ROWS = [
    {"question": f"{a}+{b}=", "answer": a + b, "expert": str(a + b), "teachers": [str(a + b)] * 3}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_saved_dataset_and_a_saved_dataset_dict_split(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(tmp_path / "ds", "prompt=question")
    assert [r.prompt for r in rows] == [r["question"] for r in ROWS] and rows[0].answer == "3"
    assert rows[2].source == f"{tmp_path / 'ds'}:2"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(load_rows(tmp_path / "dd", "prompt=question")) == 4
    test = load_rows(tmp_path / "dd", "prompt=question", split="test")
    assert [r.prompt for r in test] == ["2+2=", "9+1="] and test[1].source == f"{tmp_path / 'dd'}[test]:1"
    with pytest.raises(ValueError, match=r"has no split 'validation' \(it has train, test\)"):
        load_rows(tmp_path / "dd", "prompt=question", split="validation")


def test_a_bad_row_of_a_saved_dataset_names_the_dataset_row_and_field(tmp_path):
    bad = [dict(r) for r in ROWS]
    bad[3]["expert"] = "  "
    datasets.DatasetDict({"train": datasets.Dataset.from_list(bad)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / "dd", "prompt=question")
    assert str(info.value) == f"{tmp_path / 'dd'}[train]: row 3: field 'expert': empty"
    with pytest.raises(DataError, match=r"\[train\]: row 0: field 'prompt': missing"):
        load_rows(tmp_path / "dd")  # no column mapping: the data's 'question' is not a prompt


def test_a_folder_of_data_files_split_by_their_names(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    _jsonl(plain / "a.jsonl", ROWS[:2])
    datasets.Dataset.from_list(ROWS[2:5]).to_parquet(str(plain / "b.parquet"))
    rows = load_rows(plain, "prompt=question", split="test")  # no split names: every file, whatever the split
    assert [r.prompt for r in rows] == [r["question"] for r in ROWS[:5]]
    split = tmp_path / "split"
    split.mkdir()
    _jsonl(split / "train.jsonl", ROWS[:4])
    bad = [dict(r) for r in ROWS[4:]]
    bad[1]["teachers"] = "16"
    _jsonl(split / "test.jsonl", bad)
    assert len(load_rows(split, "prompt=question")) == 4
    with pytest.raises(DataError) as info:
        load_rows(split, "prompt=question", split="test")
    assert str(info.value).startswith(f"{split / 'test.jsonl'}: line 2: field 'teachers': expected a list of strings")
    with pytest.raises(ValueError, match=r"split into train, test, not 'dev'"):
        load_rows(split, "prompt=question", split="dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a dataset saved by datasets.save_to_disk nor"):
        load_rows(tmp_path / "empty")


def test_a_hub_name_that_cannot_load_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine may have no network; the error is the same kind
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        load_rows("gft-nobody/no-such-dataset", split="train", config="main")
    msg = str(info.value)
    assert (
        msg.startswith(
            "data 'gft-nobody/no-such-dataset' is neither a file nor a directory here, and loading it "
            "as a datasets Hub name (split 'train', config 'main') failed: "
        )
        and "\n" not in msg
    ), msg
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a path, not a name: no Hub attempt
        load_rows(tmp_path / "missing.jsonl")


def test_a_hub_name_goes_through_load_dataset_with_its_split_and_config(monkeypatch):
    """The name, split and config reach ``datasets.load_dataset``; its rows get the same checks."""
    seen = {}

    def fake_load_dataset(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("openai/gsm8k", "prompt=question", split="train", config="main")
    assert seen == dict(name="openai/gsm8k", config="main", split="train")
    assert len(rows) == 6 and rows[1].source == "openai/gsm8k[train]:1"


def test_train_and_eval_from_saved_dataset_directories(tmp_path):
    from gft_train.demo.model import build_model
    from gft_train.demo.task import make_splits

    splits = make_splits(seed=2, n_train=8, n_eval=4)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(splits["train"]), "test": datasets.Dataset.from_list(splits["eval_id"])}
    ).save_to_disk(str(tmp_path / "dd"))
    model = build_model(tmp_path / "model", hidden_size=64, layers=1)
    out = tmp_path / "run"
    cli_main(
        [
            "train",
            "--method",
            "sft",
            "--model",
            str(model),
            "--train-file",
            str(tmp_path / "dd"),
            "--eval-file",
            str(tmp_path / "dd"),
            "--eval-every",
            "2",
            "--eval-n",
            "1",
            "--eval-k",
            "1",
            "--max-new-tokens",
            "4",
            "--engine",
            "transformers",
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--prompts-per-step",
            "4",
            "--max-length",
            "16",
            "--report-to",
            "none",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval/pass@1" in rows[-1]
    with pytest.raises(ValueError, match=r"has no split 'dev'"):
        cli_main(
            [
                "train",
                "--method",
                "sft",
                "--model",
                str(model),
                "--train-file",
                str(tmp_path / "dd"),
                "--train-split",
                "dev",
                "--output-dir",
                str(tmp_path / "x"),
                "--max-steps",
                "1",
            ]
        )


def test_a_folder_given_by_a_relative_path_reads_its_split(tmp_path, monkeypatch):
    """datasets resolves a folder's split patterns to absolute paths: a folder named relative to the
    working directory (the README's `--train-file data/jsonl_folder`) read no file at all."""
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS[:4])
    _jsonl(folder / "test.jsonl", ROWS[4:6])
    monkeypatch.chdir(tmp_path)
    assert [r.prompt for r in load_rows("data", "prompt=question")] == [r["question"] for r in ROWS[:4]]
    assert [r.prompt for r in load_rows("data", "prompt=question", split="test")] == [r["question"] for r in ROWS[4:6]]


def test_no_path_is_an_error_not_the_working_directory(tmp_path, monkeypatch):
    _jsonl(tmp_path / "train.jsonl", ROWS[:2])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no data given"):
        load_rows("", "prompt=question")
