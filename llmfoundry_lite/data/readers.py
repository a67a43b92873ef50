"""Reading one unit of a source (a file, a byte range of a plain file, an ``hf:`` split) as rows.

Files are read as shipped: gzip (``.gz``) and zstd (``.zst``) decompress while streaming, never to a temporary
file; bz2 and xz too. A compressed or corrupt file fails with one line naming the file and the byte offset of
the compressed stream where reading stopped. Rows come with where they are (``'f.jsonl.gz' line 7``), so
conversion errors can name the row.

Kinds: ``json`` (JSON Lines, or one JSON array), ``parquet`` and ``arrow`` (``tables.py``), ``text`` (a file of
blank-line separated documents), ``eot`` (documents separated by ``<|endoftext|>`` lines, as TinyStories),
``textfile`` (one document per file), ``embedded`` and ``hf`` (``datasets``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator
from typing import IO, Any, Optional

from llmfoundry_lite.errors import RecipeError

# Compressions read by streaming decompression, by suffix and by the file's first bytes.
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
# Compressions and archives recognised but not read: refused with a hint rather than read as garbled text.
UNSUPPORTED = {
    ".lz4": "lz4",
    ".br": "brotli",
    ".snappy": "snappy",
    ".zip": "zip",
    ".7z": "7z",
    ".tar": "tar",
    ".tgz": "tar",
    ".rar": "rar",
}
ARCHIVES = ("zip", "7z", "tar", "rar")
UNSUPPORTED_MAGIC = {b"\x04\x22\x4d\x18": "lz4", b"PK\x03\x04": "zip", b"7z\xbc\xaf": "7z", b"Rar!": "rar"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# What a data file is when a repository was cloned without `git lfs` (or only partly pulled).
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
READ_CHUNK = 1 << 20
# A line that separates the documents of a text file when the file has one (TinyStories); else blank lines do.
END_OF_TEXT = "<|endoftext|>"
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently convertible piece of a source; plain data, so it travels to worker processes as JSON."""

    kind: str  # json | parquet | arrow | text | eot | textfile | embedded | hf
    path: str = ""  # the file ("" for embedded; the dataset name for hf)
    split: Optional[str] = None  # the source's own split (from the file name), None when it has none
    compression: Optional[str] = None
    start: int = 0  # byte range [start, end) of an uncompressed file; end -1 = to the end
    end: int = -1
    size: int = 0  # bytes read from disk (progress and ETA)
    hf_config: Optional[str] = None
    hf_split: Optional[str] = None
    hf_data_dir: Optional[str] = None
    # Further one-document files read after ``path`` (textfile): a folder of many small files is a few units, not
    # a unit, a writer and a shard per file.
    more: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        """A short name for messages."""
        if self.kind == "hf":
            return f"hf:{self.path}" + (f":{self.hf_config}" if self.hf_config else "")
        rng = f" bytes {self.start}-{self.end}" if self.end >= 0 else ""
        return f"{self.path!r}{rng}" if self.path else self.kind


def compression_of(path: str) -> tuple[str, Optional[str]]:
    """(the name without its compression suffix, the compression) of a file; RecipeError for unreadable ones.

    The first bytes decide: a ``.gz`` that holds zstd is read as zstd, and one that holds no compressed data at
    all (empty, a Git LFS pointer, plain text a downloader already unpacked) is refused before anything is
    written, rather than failing halfway as "corrupt".
    """
    stem, suffix = os.path.splitext(path)
    suffix = suffix.lower()
    if suffix in UNSUPPORTED:
        _refuse(path, UNSUPPORTED[suffix])
    if suffix in COMPRESSIONS and stem.lower().endswith(".tar"):
        _refuse(path, "tar")  # an archive of files, not one stream of documents
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError as e:
        raise RecipeError(f"cannot read {path!r}: {e.strerror or e}", key="--source") from None
    if head == LFS_POINTER:
        raise RecipeError(
            f"{path!r} is a Git LFS pointer, not the data itself; fetch the files (`git lfs pull`, or "
            "`hf download ... --repo-type dataset`) and convert again",
            key="--source",
        )
    found = None
    if suffix not in PARQUET_SUFFIXES:
        found = next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)
    if found is None:
        for magic, name in UNSUPPORTED_MAGIC.items():
            if head.startswith(magic):
                _refuse(path, name)
    if found is None and len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and 0x50 <= head[0] <= 0x5F:
        found = "zstd"  # a skippable frame first (pzstd writes one before each frame)
    if suffix in COMPRESSIONS:
        name = COMPRESSIONS[suffix]
        if not head:
            raise RecipeError(
                f"{path!r} is empty (0 bytes), not {name} data; download it again", key="--source"
            )
        if found is None:
            raise RecipeError(
                f"{path!r} at byte 0: not {name} data (it begins {head[:12]!r}); download it again (or, if it "
                f"is already uncompressed, remove {suffix!r} from its name)",
                key="--source",
            )
        return stem, found
    return path, found


def is_archive(path: str) -> bool:
    """Whether a file's name says it is an archive of files (zip, tar, 7z, rar), not a stream of documents."""
    stem, suffix = os.path.splitext(path.lower())
    return UNSUPPORTED.get(suffix) in ARCHIVES or (suffix in COMPRESSIONS and stem.endswith(".tar"))


def _refuse(path: str, what: str) -> None:
    if what in ARCHIVES:
        raise RecipeError(
            f"{path!r} at byte 0: a {what} archive (of files) is not read here; extract it and convert the files",
            key="--source",
        )
    raise RecipeError(
        f"{path!r} at byte 0: {what} compression is not read here; decompress it (or recompress it as .gz or "
        ".zst) and convert again",
        key="--source",
    )


def kind_of(path: str) -> str:
    """'json', 'parquet', 'arrow' or 'text' from a file's name (its compression suffix removed)."""
    stem, _ = compression_of(path)
    low = stem.lower()
    if low.endswith(JSON_SUFFIXES):
        return "json"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(".arrow"):  # `datasets`' save_to_disk folders and cache
        return "arrow"
    return "text"


class _Counting(io.RawIOBase):
    """A raw file that counts the bytes read from disk: the offset named in errors and the progress."""

    def __init__(self, f: IO[bytes], start: int = 0):
        self.f, self.pos = f, start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b) or 0
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class _Zstd(io.RawIOBase):
    """Streaming zstd decompression across frames; a stream that stops inside a frame is an error."""

    FEED = 1 << 16  # compressed bytes per call: bounds the output held, however well the text compresses

    def __init__(self, raw: _Counting):
        import zstandard

        # Frames written with `zstd --long=31` need a window beyond the library's default 128 MB limit.
        self.raw, self.zstd = raw, zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self.dobj = self.zstd.decompressobj()
        self.buf, self.at, self.in_frame = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.at >= len(self.buf):
            chunk = self.raw.read(self.FEED)
            if not chunk:
                if self.in_frame:
                    raise EOFError("the stream ends inside a zstd frame")
                return 0
            out = []
            while chunk:
                self.in_frame = True
                out.append(self.dobj.decompress(chunk))
                chunk = b""
                if self.dobj.eof:
                    chunk, self.in_frame = self.dobj.unused_data, False
                    self.dobj = self.zstd.decompressobj()
            self.buf, self.at = b"".join(out), 0
        n = min(len(b), len(self.buf) - self.at)
        b[:n] = self.buf[self.at : self.at + n]
        self.at += n
        return n


def _open_binary(unit: Unit) -> tuple[IO[bytes], _Counting]:
    raw = _Counting(open(unit.path, "rb"), unit.start)  # noqa: SIM115 (closed by the caller)
    if unit.compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw), raw
    if unit.compression == "zstd":
        return io.BufferedReader(_Zstd(raw), READ_CHUNK), raw
    if unit.compression == "bz2":
        import bz2

        return bz2.BZ2File(raw), raw
    if unit.compression == "xz":
        import lzma

        return lzma.LZMAFile(raw), raw
    return io.BufferedReader(raw, READ_CHUNK), raw


class Position:
    """Bytes of the source read so far by one reader (shared with the progress report)."""

    def __init__(self) -> None:
        self.done = 0
        self.line_at = 0  # where the line last read begins, in the (decompressed) stream


def read_rows(
    unit: Unit, position: Optional[Position] = None, columns: Optional[list[str]] = None
) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of ``unit``: a dict (json, parquet, hf) or a document string (text kinds).

    ``columns``: the only fields needed (Parquet then reads just those columns, a fraction of FineWeb's bytes).
    """
    pos = position or Position()
    if unit.kind == "embedded":
        from llmfoundry_lite.data.corpus import embedded_documents

        for i, d in enumerate(embedded_documents()):
            yield f"embedded document {i}", d
        return
    if unit.kind == "hf":
        yield from _read_hf(unit)
        return
    if unit.kind in ("parquet", "arrow"):
        from llmfoundry_lite.data.tables import read_table

        yield from read_table(unit, pos, columns)
        return
    if unit.more:
        for path in [unit.path, *unit.more]:
            yield from read_rows(dataclasses.replace(unit, path=path, more=[]), pos)
        return
    try:
        fh, raw = _open_binary(unit)
    except OSError as e:  # removed or made unreadable since the source was planned
        raise RecipeError(f"cannot read {unit.path!r}: {e.strerror or e}", key="--source") from None
    base = pos.done
    try:
        if unit.kind == "json":
            yield from _json_rows(_lines(fh, unit, raw, pos, base), unit)
            return
        # A text file's line ends are "\n" whatever wrote it, as Python's text mode reads it (CRLF: Windows).
        whole = dataclasses.replace(unit, end=-1)  # a range's last document goes on past its end
        lines = ((n, _lf(line)) for n, line in _lines(fh, whole, raw, pos, base))
        if unit.kind == "textfile":
            doc = "".join(line for _, line in lines).strip()
            if doc:
                yield repr(unit.path), doc
        else:
            yield from _documents(lines, unit, pos, END_OF_TEXT if unit.kind == "eot" else None)
    except RecipeError as e:
        if unit.compression and not getattr(e, "corrupt", False):
            _check_stream(fh, unit, raw)  # garbled JSON or UTF-8 from a corrupt stream: name the corruption
        raise
    finally:
        fh.close()
        raw.close()


def _failure(unit: Unit, offset: int, e: BaseException, lineno: int = 0) -> RecipeError:
    if isinstance(e, UnicodeDecodeError):
        line = f"line {lineno}{' of the range' if unit.start else ''}, " if lineno else ""
        what = f"not UTF-8 text ({line}{e.reason}); re-encode it as UTF-8"
    else:
        name = unit.compression or "file"
        detail = str(e) or type(e).__name__
        what = f"{name} stream is truncated or corrupt ({detail}); download the file again"
    err = RecipeError(f"cannot read {unit.path!r} at byte {offset}: {what}", key="--source")
    err.corrupt = not isinstance(e, UnicodeDecodeError)  # type: ignore[attr-defined]
    return err


def _lines(fh: IO[bytes], unit: Unit, raw: _Counting, pos: Position, base: int) -> Iterator[tuple[int, str]]:
    """(line number, line) of a file; a byte range holds the lines that begin inside it (none is read twice)."""
    offset = unit.start  # in the decompressed stream (the file itself when uncompressed)
    lineno = 0
    try:
        if unit.start > 0:
            with open(unit.path, "rb") as f:
                f.seek(unit.start - 1)
                starts_line = f.read(1) == b"\n"
            if not starts_line:  # this line began in the previous range
                offset += len(fh.readline())
        while unit.end < 0 or offset < unit.end:
            line = fh.readline()
            if not line:
                return
            if offset == 0 and line.startswith(BOM):  # Windows editors and some exporters start with one
                line, offset = line[len(BOM) :], len(BOM)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                at = raw.pos if unit.compression else offset + e.start
                raise _failure(unit, at, e, lineno + 1) from None
            pos.line_at = offset
            offset += len(line)
            lineno += 1
            pos.done = base + (raw.pos if unit.compression else offset) - unit.start
            yield lineno, text
    except RecipeError:
        raise
    except Exception as e:
        if _stream_error(e):
            raise _failure(unit, raw.pos, e) from None
        raise


def _stream_error(e: BaseException) -> bool:
    """Whether ``e`` is a decompressor's (or the disk's) complaint about the stream."""
    import zlib

    if isinstance(e, (EOFError, OSError, zlib.error)):
        return True
    # zstd / lzma / bz2 decoder errors have their own classes
    return type(e).__module__.split(".")[0] in ("zstandard", "_lzma", "lzma", "_bz2", "_compression")


def _check_stream(fh: IO[bytes], unit: Unit, raw: _Counting) -> None:
    """Read a compressed stream to its end: its own error when it is corrupt (a gzip CRC is checked at the end)."""
    try:
        while fh.read(READ_CHUNK):
            pass
    except Exception as e:
        if _stream_error(e):
            raise _failure(unit, raw.pos, e) from None
        raise


def _json_rows(lines: Iterator[tuple[int, str]], unit: Unit) -> Iterator[tuple[str, Any]]:
    first = True
    for lineno, line in lines:
        if not line.strip():
            continue
        if first and unit.start == 0 and line.lstrip().startswith("["):
            # One JSON array (a `.json` export) rather than JSON Lines: read it whole.
            rest = line + "".join(rest_line for _, rest_line in lines)
            try:
                rows = _loads(rest)
            except ValueError as e:
                raise RecipeError(f"cannot read {unit.path!r}: invalid JSON ({e})", key="--source") from None
            for i, row in enumerate(rows):
                yield f"{unit.path!r} row {i + 1}", _object(row, f"{unit.path!r} row {i + 1}")
            return
        first = False
        where = f"{unit.path!r} line {lineno}" + (f" of bytes {unit.start}-{unit.end}" if unit.start else "")
        try:
            row = _loads(line)
        except ValueError as e:
            hint = (
                "; expected JSON Lines (an object per line) or one JSON array of objects"
                if lineno == 1
                else ""
            )
            raise RecipeError(f"cannot read {where}: invalid JSON ({e}){hint}", key="--source") from None
        yield where, _object(row, where)


def _loads(text: str) -> Any:
    """``json.loads``, with the stray half of a UTF-16 surrogate pair made U+FFFD.

    JSON may escape half a pair alone (`"\\ud83d"`: an emoji cut by a crawler; web corpora hold some). Such a
    string cannot be encoded as UTF-8 (the MDS writer and the tokenizer would fail), so it becomes U+FFFD, as a
    UTF-8 decoder does with a bad byte. Only a row with a ``\\uD8xx``-style escape is looked at.
    """
    value = json.loads(text)
    return _no_surrogates(value) if "\\ud" in text or "\\uD" in text else value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_surrogates(v) for v in value]
    return value


def _object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise RecipeError(f"cannot read {where}: expected a JSON object per row", key="--source")
    return row


def _lf(line: str) -> str:
    return line[:-2] + "\n" if line.endswith("\r\n") else line


_BLANK = re.compile(r"^[ \t]*\r?\n?$")


def _is_separator(line: str, separator: Optional[str]) -> bool:
    """Whether a line ends a document: a ``separator`` line (``<|endoftext|>``), or a blank one when none."""
    return line.strip() == separator if separator else bool(_BLANK.match(line))


def has_end_of_text(path: str, compression: Optional[str]) -> bool:
    """Whether a text file separates its documents by ``<|endoftext|>`` lines (judged on its first MB)."""
    fh, raw = _open_binary(Unit("text", path, compression=compression))
    try:
        head = fh.read(READ_CHUNK)
    except Exception as e:
        if _stream_error(e):
            raise _failure(Unit("text", path, compression=compression), raw.pos, e) from None
        raise
    finally:
        fh.close()
        raw.close()
    return re.search(rb"(?m)^[ \t]*<\|endoftext\|>[ \t]*\r?$", head) is not None


def _documents(
    lines: Iterator[tuple[int, str]], unit: Unit, pos: Position, separator: Optional[str]
) -> Iterator[tuple[str, str]]:
    """A text file's documents, separated by blank lines (or ``separator`` lines); of a byte range, those that
    begin inside it, each read whole (past the range's end)."""
    end = unit.end if unit.end >= 0 else float("inf")
    rng = f" of bytes {unit.start}-{unit.end}" if unit.end >= 0 else ""
    prev_sep, owned, cur, start_line = True, False, [], 0
    for lineno, line in lines:
        at = pos.line_at
        if lineno == 1 and unit.start > 0:
            prev_sep = _separator_before(unit.path, at, separator)
        if _is_separator(line, separator):
            doc, cur, prev_sep = "".join(cur).strip(), [], True
            if doc:
                yield f"{unit.path!r} line {start_line}{rng}", doc
            continue
        if prev_sep:  # a document begins on this line: this range's when the line begins inside it
            if at >= end:
                return
            owned, start_line = True, lineno
        elif not owned and at >= end:
            return  # the range is inside one document begun before it
        prev_sep = False
        if owned:
            cur.append(line)
    doc = "".join(cur).strip()
    if doc:
        yield f"{unit.path!r} line {start_line}{rng}", doc


def _separator_before(path: str, at: int, separator: Optional[str]) -> bool:
    """Whether the line that ends just before byte ``at`` of a file separates documents (or there is none)."""
    if at <= 0:
        return True
    lo = max(0, at - 256)  # separator lines are short: a longer line is text
    with open(path, "rb") as f:
        f.seek(lo)
        window = f.read(at - lo)[:-1]  # the line before, without its "\n"
    if b"\n" not in window and lo > 0:
        return False
    line = window.rsplit(b"\n", 1)[-1].removeprefix(BOM)
    return _is_separator(line.decode("utf-8", "replace") + "\n", separator)


def _read_hf(unit: Unit) -> Iterator[tuple[str, Any]]:
    """Rows of one split of a Hugging Face dataset (a hub name, or a local folder through ``datasets``)."""
    import datasets

    from llmfoundry_lite.data.checks import hub_access

    datasets.logging.set_verbosity_error()
    try:
        with hub_access():  # offline or unreachable: the cache only, one error at once
            ds = datasets.load_dataset(
                unit.path, unit.hf_config, data_dir=unit.hf_data_dir, split=unit.hf_split, streaming=True
            )
        for i, row in enumerate(ds):
            yield f"{unit.label} split {unit.hf_split!r} row {i + 1}", row
    except RecipeError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise RecipeError(
            f"cannot read source {unit.label!r}: {type(e).__name__}: {e}", key="--source"
        ) from None


def text_of(row: Any, field: str, where: str) -> Optional[str]:
    """The document of a row: the row itself (text kinds) or its ``field`` (None when null).

    ``a.b`` names a nested field (``{"a": {"b": ...}}``) when the row has no field called ``a.b`` itself.
    """
    if isinstance(row, str):
        return row
    value: Any = row
    parts = [field] if field in row or "." not in field else field.split(".")
    for k, part in enumerate(parts):
        if not isinstance(value, dict) or part not in value:
            fields = ", ".join(map(str, value)) if isinstance(value, dict) else f"a {type(value).__name__}"
            at = f" (under {'.'.join(parts[:k])!r})" if k else ""
            raise RecipeError(
                f"{where} has no field {part!r}{at} (fields: {fields}); set --text-field "
                "(C4, Dolma, FineWeb and RedPajama use 'text'; 'a.b' for a nested field)",
                key="--text-field",
            )
        value = value[part]
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(f"{where}: field {field!r} is {type(value).__name__}, not text", key="--text-field")
    return value
