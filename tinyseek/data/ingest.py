"""Streaming ingest: JSONL (field configurable, ``.gz`` ok), Parquet and plain-text files or folders.

Memory is bounded by one document, not by the file: files are read a line (at most ``MAX_LINE``
bytes) at a time, Parquet in record batches of one column, and long text files are cut into
documents of about ``doc_chars`` characters at paragraph (blank-line) boundaries, with a hard cut
at ``4 * doc_chars`` for text without paragraphs.

A record that cannot be read (invalid JSON or UTF-8, missing/non-string field, unreadable file)
is yielded as a :class:`Doc` with ``text=None`` and an ``error`` and its ``path:line`` location,
so it is counted and reported, never silently skipped and never fatal. Blank JSONL lines are not
records.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tinyseek.errors import UserError

MAX_LINE = 1 << 24          # bytes read per line at a time (a longer line is read in pieces)
MAX_RECORD = 1 << 26        # a JSONL line longer than this is reported as malformed, not loaded
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".txt.gz", ".text")


@dataclass
class Doc:
    text: str | None           # document text; None for a malformed record
    source: str                # source name (for accounting)
    loc: str                   # "path:line" (JSONL, text start line) or "path:row" (Parquet)
    error: str = ""            # why the record is malformed ("" if fine)
    keys: tuple[str, ...] = ()  # a JSON record without the text field: its keys (first 20), for the error


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def scan_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] | None = None) -> tuple[list[Path], list[Path]]:
    """``(files, skipped)``: the files named by ``paths`` (folders expanded recursively, sorted;
    hidden entries ignored) and, separately, the folder entries left out for their suffix. A file
    named directly is always read (as text unless its suffix says otherwise)."""
    out: list[Path] = []
    skipped: list[Path] = []
    suffixes = suffixes or SUFFIXES
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                (out if f.name.lower().endswith(suffixes) else skipped).append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"input {p} does not exist")
    return out, skipped


def list_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files named by ``paths`` (folders expanded recursively, sorted; hidden entries skipped)."""
    return scan_files(paths, suffixes)[0]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(f, join: bool = True) -> Iterator[bytes]:
    """Lines of a binary file, read at most ``MAX_LINE`` bytes at a time. ``join=False`` yields a
    longer line in ``MAX_LINE`` pieces (plain text: memory stays bounded); ``join=True`` joins them
    (a JSON record must be whole) unless the line exceeds ``MAX_RECORD``: then it yields ``b""``
    (sentinel: record too long) after skipping the rest of the line."""
    while True:
        line = f.readline(MAX_LINE)
        if not line:
            return
        if join and not line.endswith(b"\n") and len(line) == MAX_LINE:
            parts, size = [line], len(line)
            while True:
                more = f.readline(MAX_LINE)
                size += len(more)
                if size <= MAX_RECORD:
                    parts.append(more)
                if not more or more.endswith(b"\n"):
                    break
            line = b"".join(parts) if size <= MAX_RECORD else b""
        yield line


def _read_guarded(path: Path, source: str, docs: Callable[[Any], Iterator[Doc]]) -> Iterator[Doc]:
    """``docs(binary_file)`` for ``path``; a file that cannot be opened, or fails mid-read (a
    truncated gzip, an I/O error), becomes one error ``Doc`` instead of an exception, after the
    documents read before the failure."""
    try:
        f = _open_binary(path)
    except OSError as e:
        yield Doc(None, source, f"{path}:0", f"unreadable file: {e.strerror}")
        return
    with f:
        try:
            yield from docs(f)
        except (OSError, EOFError) as e:  # truncated gzip etc.
            yield Doc(None, source, f"{path}:?", f"read error: {e}")


def _jsonl_docs(f, path: Path, text_field: str, source: str) -> Iterator[Doc]:
    for i, raw in enumerate(_lines(f), 1):
        loc = f"{path}:{i}"
        if raw == b"":
            yield Doc(None, source, loc, f"line longer than {MAX_RECORD} bytes")
            continue
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield Doc(None, source, loc, "invalid UTF-8")
            continue
        except json.JSONDecodeError as e:
            yield Doc(None, source, loc, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            yield Doc(None, source, loc, "record is not a JSON object")
            continue
        val = rec.get(text_field)
        if text_field not in rec:
            keys = tuple(str(k) for k in list(rec)[:20])
            yield Doc(None, source, loc, f"missing field {text_field!r} (keys: {', '.join(keys) or 'none'})", keys)
            continue
        if not isinstance(val, str):
            yield Doc(None, source, loc, f"non-string ({type(val).__name__}) field {text_field!r}")
            continue
        yield Doc(val, source, loc)


def iter_jsonl(path: Path, text_field: str = "text", source: str = "") -> Iterator[Doc]:
    """One document per JSON line; every bad line becomes an error ``Doc`` naming its line."""
    source = source or path.name
    yield from _read_guarded(path, source, lambda f: _jsonl_docs(f, path, text_field, source))


def iter_parquet(path: Path, text_field: str = "text", source: str = "", batch_rows: int = 1024) -> Iterator[Doc]:
    source = source or path.name
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        yield Doc(None, source, f"{path}:0", f"unreadable Parquet file ({type(e).__name__})")
        return
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"set --text-field")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for val in batch.column(0).to_pylist():
                loc = f"{path}:{row}"
                row += 1
                if isinstance(val, bytes):
                    try:
                        val = val.decode("utf-8")
                    except UnicodeDecodeError:
                        yield Doc(None, source, loc, "invalid UTF-8")
                        continue
                if not isinstance(val, str):
                    yield Doc(None, source, loc, f"non-string field {text_field!r} ({type(val).__name__})")
                    continue
                yield Doc(val, source, loc)
    except Exception as e:  # noqa: BLE001
        yield Doc(None, source, f"{path}:{row}", f"Parquet read error ({type(e).__name__})")


def chunk_paragraphs(lines: Iterable[tuple[int, str]], doc_chars: int, where: str, source: str) -> Iterator[Doc]:
    """Group ``(line_no, line)`` into documents of about ``doc_chars`` characters, cutting at blank
    lines (or anywhere past ``4 * doc_chars``). ``doc_chars <= 0``: one document (hard cap 1M chars)."""
    target = doc_chars if doc_chars > 0 else 1 << 20
    hard = 4 * doc_chars if doc_chars > 0 else 1 << 20
    buf: list[str] = []
    size, start = 0, 1
    for no, line in lines:
        if not buf:
            start = no
        buf.append(line)
        size += len(line)
        blank = not line.strip()
        if (blank and size >= target) or size >= hard:
            yield Doc("".join(buf), source, f"{where}:{start}")
            buf, size = [], 0
    if buf and "".join(buf).strip():
        yield Doc("".join(buf), source, f"{where}:{start}")


def iter_text(path: Path, doc_chars: int = 4000, source: str = "") -> Iterator[Doc]:
    """Plain text, cut into paragraph-aligned documents; invalid UTF-8 bytes become U+FFFD."""
    source = source or path.name

    def docs(f):
        lines = ((i, raw.decode("utf-8", errors="replace")) for i, raw in enumerate(_lines(f, join=False), 1))
        yield from chunk_paragraphs(lines, doc_chars, str(path), source)

    yield from _read_guarded(path, source, docs)


def iter_documents(paths: Iterable[str | Path], text_field: str = "text", doc_chars: int = 4000,
                   source: str = "") -> Iterator[Doc]:
    """All documents of the given files/folders, in sorted file order."""
    yield from iter_files(list_files(paths), text_field, doc_chars, source)


def iter_files(files: Iterable[Path], text_field: str = "text", doc_chars: int = 4000,
               source: str = "") -> Iterator[Doc]:
    """All documents of the given files (no folder expansion), in the given order."""
    for p in files:
        fmt = file_format(p)
        if fmt == "jsonl":
            yield from iter_jsonl(p, text_field, source)
        elif fmt == "parquet":
            yield from iter_parquet(p, text_field, source)
        else:
            yield from iter_text(p, doc_chars, source)


def read_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_no, line)`` of a UTF-8 text file, streaming."""
    with _open_binary(path) as f:
        for i, raw in enumerate(_lines(f, join=False), 1):
            yield i, raw.decode("utf-8", errors="replace")


__all__ = ["Doc", "iter_documents", "iter_files", "iter_jsonl", "iter_parquet", "iter_text", "chunk_paragraphs",
           "list_files", "scan_files", "file_format", "read_text_lines", "SUFFIXES"]
