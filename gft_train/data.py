"""Prompt rows from local JSONL or Parquet files (through ``datasets``), validated row by row.

Row format (one JSON object per line, or one Parquet row):

    {"prompt": str, "answer": str, "expert": str, "teachers": [str, ...]}   # teachers optional

``answer`` is the reference final answer the reward checks; ``expert`` the demonstration.
A row that lacks a field or has the wrong type stops the run with an error naming the file,
the row (0-based) and the field; nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A bad row: ``file``, ``row`` and ``field`` say where."""

    def __init__(self, file, row, field_name, message):
        super().__init__(f"{file}: row {row}: field {field_name!r}: {message}")
        self.file, self.row, self.field = str(file), row, field_name


@dataclass
class PromptRow:
    prompt: str
    answer: str
    expert: str
    teachers: list[str] = field(default_factory=list)
    source: str = ""   # "file:row", for error messages further down


REQUIRED = ("prompt", "answer", "expert")


def _check_row(path, i, raw) -> PromptRow:
    if not isinstance(raw, dict):
        raise DataError(path, i, "*", f"expected an object, got {type(raw).__name__}")
    for name in REQUIRED:
        if name not in raw or raw[name] is None:
            raise DataError(path, i, name, "missing")
        if not isinstance(raw[name], str):
            raise DataError(path, i, name, f"expected a string, got {type(raw[name]).__name__}: {raw[name]!r}"[:200])
        if name != "answer" and not raw[name].strip():
            raise DataError(path, i, name, "empty")
    teachers = raw.get("teachers")
    if teachers is None:
        teachers = []
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(t, str) for t in teachers):
        raise DataError(path, i, "teachers", f"expected a list of strings, got {teachers!r}"[:200])
    return PromptRow(raw["prompt"], raw["answer"], raw["expert"], list(teachers), f"{path}:{i}")


def load_rows(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        # parsed line by line first so a broken line is reported with its number
        import json

        raws = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                raws.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(path, len(raws), "*", f"line {i + 1} is not JSON: {err}") from None
    elif suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        raws = list(ds)
    else:
        raise ValueError(f"{path}: expected a .jsonl or .parquet file, got {suffix!r}")
    if not raws:
        raise DataError(path, 0, "*", "the file has no rows")
    return [_check_row(path, i, raw) for i, raw in enumerate(raws)]
