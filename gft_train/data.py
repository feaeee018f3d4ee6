"""Prompt rows from local JSONL or Parquet files, directories (``datasets.save_to_disk`` or a
folder of such files) or ``datasets`` Hub names, validated row by row.

Row format (one JSON object per line, or one Parquet row):

    {"prompt": str, "answer": str, "expert": str, "teachers": [str, ...]}   # teachers optional
    (a numeric answer, ``"answer": 72``, is read as its text, "72")

``answer`` is the reference final answer the reward checks; ``expert`` the demonstration.
``prompt`` may also be chat messages (``[{"role": ..., "content": ...}, ...]``, rendered by the
tokenizer's chat template), and the demonstration may be TRL's ``completion`` column (a string,
or assistant messages). ``columns`` maps these names to a file's own (``prompt=question,expert=
solution``). A row that lacks a field or has the wrong type stops the run with an error naming
the file, the row (0-based) and the field (the file's column name); nothing is dropped silently.
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
    prompt: str | list[dict]  # a text, or chat messages
    answer: str
    expert: str
    teachers: list[str] = field(default_factory=list)
    source: str = ""  # "file:row", for error messages further down


REQUIRED = ("prompt", "answer", "expert")
FIELDS = REQUIRED + ("teachers",)
ROLES = ("system", "user", "assistant", "tool")


def parse_columns(text: str) -> dict[str, str]:
    """``prompt=question,expert=solution`` -> {field: the file's column}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ours, sep, theirs = (x.strip() for x in part.partition("="))
        if not sep or not theirs or ours not in FIELDS:
            raise ValueError(f"columns: {part!r} is not FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


def _messages(path, i, name, value) -> list[dict]:
    """Chat messages checked one by one (role and content strings), as the chat template needs them."""
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(
                path, i, f"{name}[{k}]", f"expected a message {{'role': ..., 'content': ...}}, got {m!r}"[:200]
            )
        if m.get("role") not in ROLES:
            raise DataError(path, i, f"{name}[{k}].role", f"expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(path, i, f"{name}[{k}].content", f"expected a string, got {m.get('content')!r}"[:200])
    if not value:
        raise DataError(path, i, name, "empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_row(path, i, raw, columns=None) -> PromptRow:
    if not isinstance(raw, dict):
        raise DataError(path, i, "*", f"expected an object, got {type(raw).__name__}")
    columns = dict(columns or {})
    if "expert" not in columns and "expert" not in raw and "completion" in raw:
        columns["expert"] = "completion"  # TRL's prompt-completion format
    values = {}
    for name in REQUIRED:
        col = columns.get(name, name)
        value = raw.get(col)
        if value is None:
            raise DataError(path, i, col, "missing")
        if name == "prompt" and isinstance(value, list):
            values[name] = _messages(path, i, col, value)
            continue
        if name == "expert" and isinstance(value, list):  # a conversational completion: its assistant text
            said = [m["content"] for m in _messages(path, i, col, value) if m["role"] == "assistant"]
            if not said:
                raise DataError(path, i, col, "has no assistant message")
            value = "".join(said)
        if name == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric answers (GSM8K style): the reward compares text
        if not isinstance(value, str):
            what = {"prompt": "a string or a list of chat messages", "answer": "a string or a number"}.get(
                name, "a string"
            )
            raise DataError(path, i, col, f"expected {what}, got {type(value).__name__}: {value!r}"[:200])
        if name != "answer" and not value.strip():
            raise DataError(path, i, col, "empty")
        values[name] = value
    col = columns.get("teachers", "teachers")
    teachers = raw.get(col)
    if teachers is None:
        teachers = []
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(t, str) for t in teachers):
        raise DataError(path, i, col, f"expected a list of strings, got {teachers!r}"[:200])
    return PromptRow(values["prompt"], values["answer"], values["expert"], list(teachers), f"{path}:{i}")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_file(path: Path) -> list:
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
        return raws
    if suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    raise ValueError(f"{path}: expected a .jsonl or .parquet file, got {suffix!r}")


def _read_dir(path: Path, split: str) -> list[tuple[str, list]]:
    """(source, rows) of a directory: a dataset saved by ``datasets.save_to_disk`` (a DatasetDict's
    ``split``), or its .jsonl/.json/.parquet files (those of ``split`` when their names say splits,
    as ``datasets`` reads a folder: train.jsonl, test-0.parquet, ...), each file read on its own."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise ValueError(
                f"{path}: the saved dataset has no split {split!r} (it has {', '.join(saved)}): "
                "set --train-split / --eval-split"
            )
        return [(f"{path}[{split}]", list(saved[split]))]
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [(str(path), list(datasets.load_from_disk(str(path))))]
    from datasets.data_files import get_data_patterns, resolve_pattern

    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise ValueError(
            f"{path}: a directory with neither a dataset saved by datasets.save_to_disk nor "
            f"{'/'.join(DATA_SUFFIXES)} files"
        )
    patterns = {str(k): v for k, v in get_data_patterns(str(path)).items()}
    if list(patterns.values()) != [["**"]]:  # the file names say splits: only this one's files
        if split not in patterns:
            raise ValueError(
                f"{path}: its files are split into {', '.join(patterns)}, not {split!r}: "
                "set --train-split / --eval-split"
            )
        chosen = set()
        for pattern in patterns[split]:  # each of datasets' name patterns; most match nothing
            try:
                # (resolved: datasets returns absolute paths, a relative folder lists relative ones)
                chosen |= {Path(f).resolve() for f in resolve_pattern(pattern, str(path))}
            except FileNotFoundError:
                pass
        files = [f for f in files if f.resolve() in chosen]
    return [(str(f), _read_file(f)) for f in files]


def _read_hub(name: str, split: str, config: str) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # no network, no such dataset, no such split or config: one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        said = f"split {split!r}" + (f", config {config!r}" if config else "")
        raise ValueError(
            f"data {name!r} is neither a file nor a directory here, and loading it as a datasets Hub "
            f"name ({said}) failed: {type(e).__name__}: {first}"
        ) from None
    return list(ds)


def load_rows(
    path: str | Path, columns: str | dict | None = None, split: str = "train", config: str = ""
) -> list[PromptRow]:
    """The checked rows of ``path``: a .jsonl/.parquet file, a directory (``datasets.save_to_disk``
    or a folder of data files), or a ``datasets`` Hub name (``split``, ``config``). Errors name
    the file (the directory, or the dataset name with its split), the row and the field."""
    text = str(path)
    if not text:  # (Path("") is the current directory)
        raise ValueError("no data given: set --train-file (or --eval-file) to a file, a directory or a dataset name")
    path = Path(path)
    if path.is_file():
        sources = [(str(path), _read_file(path))]
    elif path.is_dir():
        sources = _read_dir(path, split)
    elif not text or path.suffix.lower() in DATA_SUFFIXES or text.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"data file {path} does not exist")  # a path, not a dataset name
    else:
        sources = [(f"{text}[{split}]", _read_hub(text, split, config))]
    columns = parse_columns(columns) if isinstance(columns, str) else columns
    rows = []
    for source, raws in sources:
        if not raws:
            raise DataError(source, 0, "*", "the file has no rows")
        rows += [_check_row(source, i, raw, columns) for i, raw in enumerate(raws)]
    if not rows:  # (a folder whose files of this split matched nothing)
        raise DataError(text, 0, "*", f"no rows of split {split!r} found there")
    return rows
