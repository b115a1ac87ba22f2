"""Opening data files: whole-file reads with gzip, and paths that name several files.

What lives here: :func:`read_bytes` (a file's bytes, ``.gz`` decompressed in chunks so that
damaged compressed data is reported with the file and the line it reached, never as a bare
``EOFError`` / ``zlib.error``), :func:`damaged_lines` (the lines of a text file that are not
UTF-8 or are too long to parse, each named, for readers that must skip or name them) and
:func:`expand_paths` (a file, a directory, a glob, or several of them separated by commas -> the
sorted list of files). What does not: parsing.
"""
import glob
import gzip
import os

from hybridps.errors import DataError

GZIP_CHUNK = 1 << 20           # decompressed bytes per read of a .gz file
#: The longest line a text data file may hold (a row of a CTR data set is a few kB; a longer
#: line is a bad line: named, or skipped and counted under on_bad_line=skip).
MAX_LINE_BYTES = 32 << 20


def damaged_lines(raw, max_line_bytes=MAX_LINE_BYTES):
    """{0-based line index: what is wrong} of the lines of ``raw`` (split at ``\n``) that are
    not valid UTF-8 or are longer than ``max_line_bytes``. One pass per line: readers run it
    only once a whole-file parse or decode has failed."""
    found = {}
    for index, line in enumerate(raw.split(b"\n")):
        if len(line) > max_line_bytes:
            found[index] = (f"the line is {len(line)} bytes long; a line may hold at most "
                            f"{max_line_bytes} bytes")
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            found[index] = f"not valid UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
    return found


def read_bytes(path):
    """The bytes of ``path`` (decompressed if it ends in .gz).

    Raises:
        DataError: missing file, unreadable file, damaged gzip data (naming the line reached).
    """
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist (or is not a file)")
    try:
        if not path.endswith(".gz"):
            with open(path, "rb") as fh:
                return fh.read()
        parts, newlines = [], 0
        try:
            with gzip.open(path, "rb") as fh:
                while True:
                    chunk = fh.read1(GZIP_CHUNK)
                    if not chunk:
                        break
                    parts.append(chunk)
                    newlines += chunk.count(b"\n")
        except (EOFError, gzip.zlib.error, gzip.BadGzipFile) as exc:
            what = ("truncated: the compressed data ends before its end-of-stream marker"
                    if isinstance(exc, EOFError) else f"corrupt: {exc}")
            raise DataError(f"{path}, line {newlines + 1}: damaged gzip file ({what}); "
                            f"{newlines} complete lines were decompressed before the damage") from None
        return b"".join(parts)
    except OSError as exc:
        raise DataError(f"cannot read data file {path!r}: {exc}") from exc


def expand_paths(spec, suffixes=None):
    """The files a data spec names: a file, a directory (its files, not recursing into
    subdirectories, hidden and temporary names skipped), a glob, or several such separated by
    commas; sorted by name, without repeats.

    Args:
        suffixes: if given, directory listings keep only names ending in one of these.
    Raises:
        DataError: a part that names nothing.
    """
    found = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if os.path.isdir(part):
            names = sorted(n for n in os.listdir(part)
                           if not n.startswith((".", "_")) and os.path.isfile(os.path.join(part, n))
                           and (suffixes is None or n.endswith(tuple(suffixes))))
            if not names:
                raise DataError(f"data directory {part!r} holds no data files"
                                + (f" (ending in {', '.join(suffixes)})" if suffixes else ""))
            found += [os.path.join(part, n) for n in names]
        elif os.path.isfile(part):
            found.append(part)
        elif glob.has_magic(part):
            matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data path pattern {part!r} matches no file")
            found += matches
        else:
            raise DataError(f"data path {part!r} does not exist")
    return list(dict.fromkeys(found))
