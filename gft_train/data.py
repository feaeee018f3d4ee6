"""Prompt rows from local files (JSON Lines, a JSON array, CSV/TSV, Parquet; the text ones also
gzip-, bz2- or xz-compressed, as ``datasets`` reads them), directories (``datasets.save_to_disk``
or a folder of such files) or ``datasets`` Hub names, validated row by row.

Row format (one JSON object per line, an object of a JSON array, or one CSV/Parquet row):

    {"prompt": str, "answer": str, "expert": str, "teachers": [str, ...]}   # teachers optional
    (a numeric answer, ``"answer": 72``, is read as its text, "72")

``answer`` is the reference final answer the reward checks; ``expert`` the demonstration. Only
a method whose update a reward drives (gft, grpo) needs an answer in every row; SFT and DFT rows
may have none. ``prompt`` may also be chat messages (``[{"role": ..., "content": ...}, ...]``,
rendered by the tokenizer's chat template), and the demonstration may be TRL's ``completion``
column (a string, or assistant messages). ``columns`` maps these names to a file's own
(``prompt=question,expert=solution``). A row that lacks a field or has the wrong type stops the
run with an error naming the file, where in it (``line N``: the text file's physical line,
1-based, as an editor shows it; ``row N``: a table's row, 0-based) and the field (the file's
column name); nothing is dropped silently. CSV cells are text (an answer ``007`` stays
``007``); an empty cell is a missing value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A bad row: ``file``, ``row`` (0-based, among the rows; None where not known), ``line``
    (the text file's 1-based physical line, else None) and ``field`` say where."""

    def __init__(self, file, row, field_name, message, line=None):
        where = f"line {line}" if line is not None else f"row {row}"
        super().__init__(f"{file}: {where}: field {field_name!r}: {message}")
        self.file, self.row, self.line, self.field = str(file), row, line, field_name


@dataclass
class PromptRow:
    prompt: str | list[dict]  # a text, or chat messages
    answer: str | None  # None: the row has none (allowed where no reward drives the update)
    expert: str
    teachers: list[str] = field(default_factory=list)
    source: str = ""  # "file:line" of a text file, "file:row" of a table, for error messages further down
    line: int | None = None  # the 1-based line of a text file (``source`` ends with it)

    def error(self, field_name: str, message: str) -> DataError:
        """A DataError at this row."""
        file, _, where = self.source.rpartition(":")
        return DataError(file, None if self.line is not None else where, field_name, message, line=self.line)


REQUIRED = ("prompt", "answer", "expert")
FIELDS = REQUIRED + ("teachers",)
ROLES = ("system", "user", "assistant", "tool")


def parse_columns(text: str) -> dict[str, str]:
    """``prompt=question,expert=solution`` -> {field: the file's column}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ours, sep, theirs = (x.strip() for x in part.partition("="))
        if not sep or not theirs or ours not in FIELDS:
            raise ValueError(f"--columns: {part!r} is not FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


def _messages(err, name, value) -> list[dict]:
    """Chat messages checked one by one (role and content strings), as the chat template needs them."""
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise err(f"{name}[{k}]", f"expected a message {{'role': ..., 'content': ...}}, got {m!r}"[:200])
        if m.get("role") not in ROLES:
            raise err(f"{name}[{k}].role", f"expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise err(f"{name}[{k}].content", f"expected a string, got {m.get('content')!r}"[:200])
    if not value:
        raise err(name, "empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_row(path, i, raw, columns=None, line=None, answers=True) -> PromptRow:
    """Row ``i`` (at ``line`` of a text file) checked; ``answers``: every row needs a non-empty
    answer (a reward compares responses with it), else a missing or empty one is None."""

    def err(field_name, message):
        return DataError(path, i, field_name, message, line=line)

    if not isinstance(raw, dict):
        raise err("*", f"expected an object, got {type(raw).__name__}")
    columns = dict(columns or {})
    if "expert" not in columns and "expert" not in raw and "completion" in raw:
        columns["expert"] = "completion"  # TRL's prompt-completion format
    values = {}
    for name in REQUIRED:
        col = columns.get(name, name)
        value = raw.get(col)
        if value is None:
            if name == "answer" and not answers:
                values[name] = None
                continue
            raise err(col, "missing" + (" (the method's reward compares each response with it)" * (name == "answer")))
        if name == "prompt" and isinstance(value, list):
            values[name] = _messages(err, col, value)
            continue
        if name == "expert" and isinstance(value, list):  # a conversational completion: its assistant text
            said = [m["content"] for m in _messages(err, col, value) if m["role"] == "assistant"]
            if not said:
                raise err(col, "has no assistant message")
            value = "".join(said)
        if name == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric answers (GSM8K style): the reward compares text
        if not isinstance(value, str):
            what = {"prompt": "a string or a list of chat messages", "answer": "a string or a number"}.get(
                name, "a string"
            )
            raise err(col, f"expected {what}, got {type(value).__name__}: {value!r}"[:200])
        if not value.strip():
            if name == "answer" and not answers:
                value = None
            elif name == "answer":  # every response would score 0 against it: the group teaches nothing
                raise err(col, "empty: the method's reward compares each response with it")
            else:
                raise err(col, "empty")
        values[name] = value
    col = columns.get("teachers", "teachers")
    teachers = raw.get(col)
    if teachers is None:
        teachers = []
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(t, str) for t in teachers):
        raise err(col, f"expected a list of strings, got {teachers!r}"[:200])
    source = f"{path}:{line if line is not None else i}"
    return PromptRow(values["prompt"], values["answer"], values["expert"], list(teachers), source, line)


# file formats by name ending, each also compressed (.gz, .bz2, .xz) where it is text
TEXT_FORMATS = (".jsonl", ".json", ".csv", ".tsv")
COMPRESSIONS = (".gz", ".bz2", ".xz")
DATA_SUFFIXES = (*TEXT_FORMATS, ".parquet")


def data_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) of a data file by its name (``d.json.gz`` -> (".json", ".gz")), or None."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return ".parquet", ""
    for compression in ("", *COMPRESSIONS):
        for fmt in TEXT_FORMATS:
            if name.endswith(fmt + compression):
                return fmt, compression
    return None


def _text(path: Path, compression: str) -> str:
    """The file's text; a byte that is not UTF-8 names its line."""
    data = path.read_bytes()
    if compression:
        import bz2
        import gzip
        import lzma

        opener = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}[compression]
        try:
            data = opener(data)
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a {compression} file: {e}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors, Excel)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            path,
            None,
            "*",
            f"byte 0x{data[e.start]:02x} at column {column} is not UTF-8 text: save the file as UTF-8",
            line=line,
        ) from None


def _json_lines(path, text: str) -> list[tuple[int, object]]:
    """(line, value) of each non-blank line (lines split at newlines only: a JSON string may hold
    U+2028 and the like, which str.splitlines would split at)."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = (
                " (a .json file holds one JSON object per line, or a JSON array of objects)"
                if n == 1 and data_format(Path(path))[0] == ".json"
                else ""
            )
            raise DataError(path, len(rows), "*", f"not JSON: {e}{hint}", line=n) from None
    return rows


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(path, text: str) -> list[tuple[int, object]]:
    """(line, item) of each item of a JSON array, the line where the item starts."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, None, "*", f"not JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    decoder, pos, line, counted = json.JSONDecoder(), _SPACE.match(text, text.index("[") + 1).end(), 1, 0
    rows = []
    for item in items:
        line += text.count("\n", counted, pos)
        counted = pos
        rows.append((line, item))
        pos = _SPACE.match(text, decoder.raw_decode(text, pos)[1]).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
    return rows


def _csv(path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    """(line, {column: cell}) of each row under the header; cells as text, an empty one None."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, rows = None, []
    while True:
        before = reader.line_num
        try:
            cells = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            raise DataError(path, len(rows), "*", f"not CSV: {e}", line=before + 1) from None
        if not cells:  # a blank line
            continue
        if header is None:
            header = cells
            continue
        if len(cells) != len(header):
            raise DataError(
                path, len(rows), "*", f"has {len(cells)} cells, the header has {len(header)}", line=before + 1
            )
        rows.append((before + 1, {k: v if v != "" else None for k, v in zip(header, cells)}))


def _read_file(path: Path) -> list[tuple[int | None, object]]:
    """(line, raw row) of each row of a data file (line None in a Parquet file)."""
    fmt = data_format(path)
    if fmt is None:
        raise ValueError(
            f"{path}: expected a {', '.join(DATA_SUFFIXES)} file (the text ones also {'/'.join(COMPRESSIONS)}), "
            f"got {path.name!r}"
        )
    fmt, compression = fmt
    if fmt == ".parquet":
        import datasets

        return [(None, r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    text = _text(path, compression)
    if fmt in (".csv", ".tsv"):
        return _csv(path, text, "," if fmt == ".csv" else "\t")
    if fmt == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    return _json_lines(path, text)


def _read_dir(path: Path, split: str) -> list[tuple[str, list]]:
    """(source, rows) of a directory: a dataset saved by ``datasets.save_to_disk`` (a DatasetDict's
    ``split``), or its data files (those of ``split`` when their names say splits,
    as ``datasets`` reads a folder: train.jsonl, test-0.parquet, ...), each file read on its own."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise ValueError(
                f"{path}: the saved dataset has no split {split!r} (it has {', '.join(saved)}): "
                "set --train-split / --eval-split"
            )
        return [(f"{path}[{split}]", [(None, r) for r in saved[split]])]
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [(str(path), [(None, r) for r in datasets.load_from_disk(str(path))])]
    from datasets.data_files import get_data_patterns, resolve_pattern

    files = sorted(f for f in path.rglob("*") if f.is_file() and data_format(f) is not None)
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
    return [(None, r) for r in ds]


def load_rows(
    path: str | Path, columns: str | dict | None = None, split: str = "train", config: str = "", answers: bool = True
) -> list[PromptRow]:
    """The checked rows of ``path``: a data file, a directory (``datasets.save_to_disk`` or a
    folder of data files), or a ``datasets`` Hub name (``split``, ``config``). Errors name the
    file (the directory, or the dataset name with its split), the line or row and the field.
    ``answers``: every row needs a non-empty answer (a reward scores against it); else rows may
    lack one (``PromptRow.answer`` None)."""
    text = str(path)
    if not text:  # (Path("") is the current directory)
        raise ValueError("no data given: set --train-file (or --eval-file) to a file, a directory or a dataset name")
    path = Path(path)
    if path.is_file():
        sources = [(str(path), _read_file(path))]
    elif path.is_dir():
        sources = _read_dir(path, split)
    elif data_format(path) is not None or text.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"data file {path} does not exist")  # a path, not a dataset name
    else:
        sources = [(f"{text}[{split}]", _read_hub(text, split, config))]
    columns = parse_columns(columns) if isinstance(columns, str) else columns
    rows = []
    for source, raws in sources:
        if not raws:
            raise DataError(source, 0, "*", "the file has no rows")
        rows += [_check_row(source, i, raw, columns, line, answers) for i, (line, raw) in enumerate(raws)]
    if not rows:  # (a folder whose files of this split matched nothing)
        raise DataError(text, 0, "*", f"no rows of split {split!r} found there")
    return rows
