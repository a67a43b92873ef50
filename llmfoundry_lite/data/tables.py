"""Reading columnar files as rows: Parquet (FineWeb, the hub's exports) and Arrow (``datasets``' ``save_to_disk``).

Both are read by record batch, only the columns asked for (the text column of FineWeb is a fraction of its
bytes); a missing column, an unreadable file and a damaged page are each one line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError, first_line

BATCH_ROWS = 1024


def read_table(unit: Any, pos: Any, columns: Optional[list[str]]) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a Parquet or Arrow file, with only ``columns`` (all when None).

    ``unit`` and ``pos`` are readers.py's ``Unit`` and ``Position`` (not imported: readers.py imports this module).
    """
    reader = _Parquet(unit) if unit.kind == "parquet" else _Arrow(unit)
    if columns is not None:
        missing = [c for c in columns if c.split(".")[0] not in reader.names]
        if missing:
            raise RecipeError(
                f"{unit.path!r} has no column {missing[0]!r} (columns: {', '.join(reader.names)}); set "
                "--text-field",
                key="--text-field",
            )
        columns = sorted({c if c in reader.names else c.split(".")[0] for c in columns})  # `meta.text`: meta
    base, row = pos.done, 0
    try:
        for batch in reader.batches(columns):
            for r in batch.to_pylist():
                row += 1
                yield f"{unit.path!r} row {row}", r
            pos.done = base + reader.done(row)
    except Exception as e:  # a damaged page: pyarrow raises OSError or ArrowException, often on several lines
        at, group = reader.where(row)
        raise RecipeError(
            f"cannot read {unit.path!r} at byte {at}{group} after row {row}: the {reader.what} data is corrupt "
            f"({first_line(e)}); download it again",
            key="--source",
        ) from None
    finally:
        reader.close()


class _Parquet:
    what = "Parquet"

    def __init__(self, unit: Any):
        import pyarrow.parquet as pq

        self.unit = unit
        try:
            self.pf = pq.ParquetFile(unit.path)
        except Exception as e:
            raise RecipeError(
                f"cannot read {unit.path!r} at byte 0: not a Parquet file, or a truncated one ({first_line(e)}); "
                "download it again",
                key="--source",
            ) from None
        self.names = self.pf.schema_arrow.names
        self.meta = self.pf.metadata

    def batches(self, columns: Optional[list[str]]) -> Iterator[Any]:
        return self.pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)

    def close(self) -> None:
        self.pf.close()

    def done(self, rows: int) -> int:
        return self.unit.size * rows // max(1, self.meta.num_rows)

    def where(self, rows: int) -> tuple[int, str]:
        """The byte where the row group after ``rows`` rows begins, and its number."""
        meta, group, before = self.meta, 0, 0
        while group < meta.num_row_groups - 1 and before + meta.row_group(group).num_rows <= rows:
            before, group = before + meta.row_group(group).num_rows, group + 1
        cols = (
            [meta.row_group(group).column(c) for c in range(meta.num_columns)] if meta.num_row_groups else []
        )
        at = min((c.dictionary_page_offset or c.data_page_offset) for c in cols) if cols else 0
        return at, f" (row group {group})"


class _Arrow:
    what = "Arrow"

    def __init__(self, unit: Any):
        import pyarrow as pa

        self.unit, self.src = unit, pa.memory_map(unit.path)
        try:  # `datasets` writes the stream format; `pyarrow.feather` / IPC files have a footer
            try:
                self.reader: Any = pa.ipc.open_file(self.src)
            except pa.ArrowInvalid:
                self.src.seek(0)
                self.reader = pa.ipc.open_stream(self.src)
        except Exception as e:
            raise RecipeError(
                f"cannot read {unit.path!r} at byte 0: not an Arrow file, or a truncated one ({first_line(e)}); "
                "download it again",
                key="--source",
            ) from None
        self.names = self.reader.schema.names

    def batches(self, columns: Optional[list[str]]) -> Iterator[Any]:
        if hasattr(self.reader, "num_record_batches"):
            raw = (self.reader.get_batch(i) for i in range(self.reader.num_record_batches))
        else:
            raw = iter(self.reader)
        return (b.select(columns) if columns is not None else b for b in raw)

    def close(self) -> None:
        self.src.close()

    def done(self, rows: int) -> int:
        return min(self.unit.size, self.src.tell())

    def where(self, rows: int) -> tuple[int, str]:
        return self.src.tell(), ""
