"""Reading data files row by row, and accounting for every row that is dropped or cut.

Local files are read here, not through `datasets`: its JSON loader reports a bad line as an Arrow error
without the line number and casts column types, which would hide exactly the rows that must be named.
Hub ids go through `datasets.load_dataset`.

Rows are numbered from 0 in the user's own file: in JSON lines, row N is line N + 1 (blank lines are not
rows but keep their number, so a row number always points at its line); in a JSON list or Parquet file,
row N is the N-th record. Every message names the file and says which convention it uses
("row 218 (line 219)" for JSON lines). `.jsonl.gz` and `.json.gz` are read the same way, decompressed.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
FIRST_ROWS = 5
"""How many row numbers per reason a log line names."""


class DataError(ValueError):
    """A data row (or file) is unusable; the message is one line naming file, row and field."""


class BadRow(Exception):
    """A row failed a check: turned into a DataError or a counted skip by the caller."""

    def __init__(self, reason: str, field_name: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


def local_suffix(path: str | Path) -> str:
    """The data suffix of a file name ('.jsonl.gz' counts as one), '' for anything else."""
    name = Path(path).name.lower()
    return next((s for s in sorted(LOCAL_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def is_json_lines(source: str) -> bool:
    return local_suffix(source) in (".jsonl", ".jsonl.gz")


def where(source: str, row: int) -> str:
    """'row 218 (line 219)' for JSON lines, 'row 218' otherwise; 'row ?' when the row is unknown."""
    if row < 0:
        return "row ?"
    return f"row {row} (line {row + 1})" if is_json_lines(source) else f"row {row}"


def row_message(source: str, row: int, field_name: str | None, detail: str) -> str:
    named = f" field {field_name!r}" if field_name else ""
    # One line, whatever the data held: row contents never enter messages, but be safe about newlines.
    return f"{source} {where(source, row)}{named}: {detail}".replace("\n", "\\n")


# ------------------------------------------------------------------------------------------------- reading


def read_rows(path: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """(row, object or BadRow) for a local JSON/JSONL(.gz)/Parquet file or a hub dataset id.

    A file that cannot be read at all (missing, empty, not gzip, not Parquet, not UTF-8 as one JSON
    document) is a DataError naming it; a bad row inside a readable file is a BadRow for the caller.
    """
    local = Path(path).expanduser()
    suffix = local_suffix(local)
    if not (local.is_file() or suffix):
        import datasets  # heavy import, only for hub ids

        yield from enumerate(datasets.load_dataset(path, split=split))
        return
    if not local.is_file():
        raise DataError(f"{path}: file not found" if not local.exists() else f"{path}: not a file")
    if not suffix:
        raise DataError(f"{path}: unsupported file type; use {'/'.join(LOCAL_SUFFIXES)} or a hub id")
    if local.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(local, path)
        elif suffix in (".json", ".json.gz"):
            yield from _json_document_rows(local, path)
        else:
            with _open_binary(local) as handle:
                yield from _json_lines(handle)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    except PermissionError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror})") from None


def _open_binary(local: Path) -> BinaryIO:
    return gzip.open(local, "rb") if local.name.lower().endswith(".gz") else open(local, "rb")  # noqa: SIM115


def _parquet_rows(local: Path, path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(local).iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                yield row, item
                row += 1
    except (pa.ArrowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        at = f" at row {row}" if row else ""
        raise DataError(f"{path}: not a readable Parquet file{at} ({first})") from None


def _json_document_rows(local: Path, path: str) -> Iterator[tuple[int, Any]]:
    with _open_binary(local) as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: not valid UTF-8 on line {line} (byte 0x{raw[err.start]:02x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(text.encode("utf-8").split(b"\n"))  # not one document: JSON lines
        return
    yield from enumerate(_json_records(path, data))


def _json_records(path: str, data: Any) -> list[Any]:
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the records under one key; else one row
        values = list(data.values())
        data = values[0] if len(values) == 1 and isinstance(values[0], list) else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON lines), got {type(data).__name__}")
    return data


def _json_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    """Rows of JSON lines read as bytes: a bad byte is that row's error, not the whole file's."""
    for row, raw in enumerate(lines):  # splits on b"\n" only, never on U+2028 inside a string
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            detail = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start} of the line)"
            yield row, BadRow("invalid_utf8", None, detail)
            continue
        if not line.strip():
            continue  # blank lines are not rows (a trailing newline is common)
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as err:
            yield row, BadRow("invalid_json", None, f"invalid JSON: {err.msg} at column {err.colno}")


# ---------------------------------------------------------------------------------------------- accounting


@dataclass
class DataReport:
    """What happened to the rows of one source: read, kept, skipped (per reason), cut (per tokenizer).

    `metrics()` is what a stage manifest holds, `summary()` the log line, `skipped_records()` the rows of
    a `skipped.jsonl`. Row numbers are the user's (see the module docstring).
    """

    source: str
    n_rows: int = 0
    n_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """reason -> count. Malformed (data.on_bad_row): invalid_json, invalid_utf8, not_an_object, missing_field,
    wrong_type, wrong_format, empty_prompt, empty_response, identical_responses. Always skipped: duplicate.
    Length (data.on_too_long=skip): too_long."""
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)
    """One {row, reason, field, message} per skipped row, in file order."""
    truncated: dict[str, list[int]] = field(default_factory=dict)
    """'<tokenizer>/prompt' or '<tokenizer>/response' -> rows cut that way under that tokenizer."""
    unknown_tokens: dict[str, list[int]] = field(default_factory=dict)
    """tokenizer -> rows whose rendered prompt holds the tokenizer's unknown token."""
    format: str = ""
    """The format read (detected with format=auto)."""
    prompt_template: str = ""
    """How prompts were rendered: raw or chat (data.prompt_template resolved)."""

    def skip(self, row: int, reason: str, field_name: str | None, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_rows.append({"row": row, "reason": reason, "field": field_name, "message": message})

    @property
    def n_truncated(self) -> int:
        """Rows cut under at least one tokenizer."""
        return len({row for rows in self.truncated.values() for row in rows})

    def first_rows(self, limit: int = FIRST_ROWS) -> dict[str, list[int]]:
        """reason (or 'truncated/<tokenizer>/<part>') -> the first `limit` row numbers, for a log line."""
        out: dict[str, list[int]] = {}
        for record in self.skipped_rows:
            rows = out.setdefault(record["reason"], [])
            if len(rows) < limit:
                rows.append(record["row"])
        for kind, rows in sorted(self.truncated.items()):
            out[f"truncated/{kind}"] = sorted(rows)[:limit]
        return out

    def metrics(self) -> dict[str, Any]:
        """Flat counts for a stage manifest: data/n_rows, data/skipped/<reason>, data/truncated/<tok>/<part>."""
        out: dict[str, Any] = {"data/n_rows": self.n_rows, "data/n_kept": self.n_kept,
                               "data/n_skipped": sum(self.skipped.values()), "data/n_truncated": self.n_truncated}
        if self.format:
            out["data/format"] = self.format
        if self.prompt_template:
            out["data/prompt_template"] = self.prompt_template
        out.update({f"data/skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        out.update({f"data/truncated/{kind}": len(rows) for kind, rows in sorted(self.truncated.items())})
        out.update({f"data/unknown_tokens/{tok}": len(rows) for tok, rows in sorted(self.unknown_tokens.items())})
        return out

    def skipped_records(self) -> list[dict[str, Any]]:
        """The rows of skipped.jsonl: {source, row, reason, field, message}, in file order."""
        return [{"source": self.source, **record} for record in sorted(self.skipped_rows, key=lambda r: r["row"])]

    def summary(self) -> str:
        """One log line: kept of read, then each reason with its count and first row numbers."""
        parts = [f"{self.source}: kept {self.n_kept} of {self.n_rows} rows"]
        first = self.first_rows()
        for reason, count in sorted(self.skipped.items()):
            parts.append(f"skipped {count} {reason} (rows {_rows(first[reason], count)})")
        for kind, rows in sorted(self.truncated.items()):
            tokenizer, part = kind.split("/")
            listed = _rows(first[f"truncated/{kind}"], len(rows))
            parts.append(f"cut {len(rows)} {part}s for the {tokenizer} tokenizer (rows {listed})")
        for tok, rows in sorted(self.unknown_tokens.items()):
            listed = _rows(sorted(rows)[:FIRST_ROWS], len(rows))
            parts.append(f"{len(rows)} prompts hold the {tok} tokenizer's unknown token (rows {listed})")
        return "; ".join(parts)

    def merge(self, later: DataReport) -> DataReport:
        """This (loading) report followed by a later check of the kept rows (lengths, tokenizers)."""
        skipped = dict(self.skipped)
        for reason, count in later.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        truncated = {k: sorted(set(self.truncated.get(k, [])) | set(later.truncated.get(k, [])))
                     for k in {*self.truncated, *later.truncated}}
        unknown = {k: sorted(set(self.unknown_tokens.get(k, [])) | set(later.unknown_tokens.get(k, [])))
                   for k in {*self.unknown_tokens, *later.unknown_tokens}}
        return DataReport(self.source, self.n_rows, later.n_kept, skipped, self.skipped_rows + later.skipped_rows,
                          truncated, unknown, self.format or later.format,
                          later.prompt_template or self.prompt_template)


def _rows(first: list[int], count: int) -> str:
    return ", ".join(map(str, first)) + (", ..." if count > len(first) else "")


def reject(bad: BadRow, source: str, row: int, policy: str, report: DataReport) -> None:
    """`policy` error: raise the one-line DataError; skip: count the row (with its message) in `report`."""
    message = row_message(source, row, bad.field_name, bad.detail)
    if policy == "error":
        raise DataError(message) from None
    report.skip(row, bad.reason, bad.field_name, message)


__all__ = ["LOCAL_SUFFIXES", "BadRow", "DataError", "DataReport", "local_suffix", "read_rows", "reject",
           "row_message", "where"]
