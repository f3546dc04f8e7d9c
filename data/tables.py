"""Reading source tables (CSV or Parquet) into polars, every problem a :class:`CatalogError` naming the file.

CSV files are read as text only (validation in :mod:`data.catalog` decides the types, so ``"007"`` keeps its
zeros), with these rules:

- **Encoding:** UTF-8, with or without a byte-order mark, or UTF-16/UTF-32 with a byte-order mark (what
  spreadsheet programs write as "Unicode text"). Any other bytes are refused, naming the line and byte offset
  of the first one that is not UTF-8 (a Latin-1 or Windows-1252 export: save it as UTF-8).
- **Delimiter:** a comma; a ``.tsv``/``.tab`` file uses tabs. When the header line holds no comma but exactly
  one of ``;``, tab or ``|``, that one is used (a spreadsheet's "CSV" in many locales uses ``;``).
- **Refused:** an empty file, a header that names a column twice, a row with more fields than the header (named
  by its line), and a quote that is never closed. A row with fewer fields reads its missing cells as empty.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from pathlib import Path

import polars as pl

from errors import CatalogError

logger = logging.getLogger(__name__)

# Byte-order marks of the encodings read besides UTF-8, longest first (UTF-32 LE starts like UTF-16 LE).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_OTHER_SEPARATORS = (";", "\t", "|")
_HEAD_BYTES = 1 << 16  # enough of a file to find its header line


def read_table(path: str | Path) -> pl.DataFrame:
    """A Parquet file (by its suffix or its first bytes) or a CSV file (see the module docstring) as a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: file not found")
    if path.is_dir():
        raise CatalogError(f"{path}: is a folder, not a CSV or Parquet file")
    try:
        df = pl.read_parquet(path) if _is_parquet(path) else _read_csv(path)
    except CatalogError:
        raise
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError, ValueError) as err:
        raise CatalogError(f"{path}: cannot be read as a table ({_reason(err)})") from None
    _refuse_repeated_columns(df, path)
    return df


def _is_parquet(path: Path) -> bool:
    """By the suffix (any case), or by Parquet's ``PAR1`` magic bytes whatever the file is called."""
    if path.suffix.lower() == ".parquet":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"PAR1"


def _read_csv(path: Path) -> pl.DataFrame:
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES)
    if not head.strip():
        raise CatalogError(f"{path}: empty file (a CSV needs a header line)")
    source: Path | io.BytesIO = path
    for bom, encoding in _BOMS:
        if head.startswith(bom):  # decoded whole: such files come from spreadsheets, and are small
            try:
                text = path.read_bytes().decode(encoding)
            except UnicodeDecodeError as err:
                raise CatalogError(f"{path}: not valid {encoding.upper()} text at byte {err.start} "
                                   f"({err.reason})") from None
            head = text[:_HEAD_BYTES].encode("utf-8")
            source = io.BytesIO(text.removeprefix("\ufeff").encode("utf-8"))
            break
    else:
        _refuse_non_utf8(path)
    separator = _separator(path, head)
    try:
        return pl.read_csv(source, infer_schema=False, separator=separator)
    except pl.exceptions.ComputeError as err:
        if "more fields than defined" in str(err):
            raise CatalogError(f"{path}: {_ragged_row(path, source, separator)}") from None
        if "not properly escaped" in str(err):
            raise CatalogError(f"{path}: cannot be read as a table (a quoted field is never closed, or a '\"' "
                               "inside one is not doubled)") from None
        raise


def _separator(path: Path, head: bytes) -> str:
    """The CSV delimiter: see the module docstring."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    header = head.removeprefix(codecs.BOM_UTF8).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    found = [s for s in _OTHER_SEPARATORS if s in header]
    if "," not in header and len(found) == 1:
        logger.info("%s: the header holds no comma; reading it as separated by %r", path, found[0])
        return found[0]
    return ","


def _refuse_non_utf8(path: Path) -> None:
    """Raise a :class:`CatalogError` naming the line and byte of the first non-UTF-8 byte, if there is one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block (never a newline)
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                data = pending + block  # what err.start indexes
                line = lines + data[:err.start].count(b"\n")
                raise CatalogError(
                    f"{path}: line {line} is not UTF-8 text (byte {offset - len(pending) + err.start}: "
                    f"{data[err.start:err.start + 1]!r}); save the file as UTF-8") from None
            offset, lines = offset + len(block), lines + block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CatalogError(f"{path}: ends inside a UTF-8 character (a truncated file?)") from None


def _ragged_row(path: Path, source: Path | io.BytesIO, separator: str) -> str:
    """Which row has more fields than the header (read with Python's csv module, only when polars refused it)."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
        text = io.TextIOWrapper(source, encoding="utf-8", newline="")
    else:
        text = path.open(encoding="utf-8", newline="")
    with text:
        reader = csv.reader(text, delimiter=separator)
        width = len(next(reader, []))
        for row in reader:
            if len(row) > width:
                return (f"line {reader.line_num} has {len(row)} fields, the header {width} (an unquoted "
                        f"{separator!r} inside a field?)")
    return "a row has more fields than the header"


def _refuse_repeated_columns(df: pl.DataFrame, path: Path) -> None:
    """polars renames a repeated header name to ``<name>_duplicated_<n>``; which one is meant is ambiguous."""
    for column in df.columns:
        base, sep, n = column.rpartition("_duplicated_")
        if sep and n.isdigit() and base in df.columns:
            raise CatalogError(f"{path}: the header names column {base!r} twice")


def _reason(err: Exception) -> str:
    """The first line of an error's message (polars adds paragraphs of hints), or its type when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
