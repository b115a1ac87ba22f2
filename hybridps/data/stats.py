"""What the readers report, combined over ranks: data_stats, skipped lines, same data everywhere.

What lives here: :func:`combine_data_stats` (one ``data_stats`` dict of the metrics from every
rank's ``dataset.stats()``), the console line about skipped malformed lines, the check that
every rank read the same file, and the warning when a batch is larger than a rank's share.
What does not: reading (the readers), the metrics file (hybridps.metrics).
"""
import re

from hybridps.wording import counted

_ADDITIVE_DATA_STATS = ("rows", "bad_lines", "positives", "dropped_rows", "refilled_rows", "bad_parts",
                        "rows_read")
_PER_RANK_DATA_STATS = ("rank", "rows", "bad_lines", "positives", "epoch", "offset", "parse_seconds")
_DATA_EXAMPLES = 10
_LINE_OF_EXAMPLE = re.compile(r", line (\d+): ")


def combine_data_stats(per_rank):
    """One ``data_stats`` dict from every rank's ``dataset.stats()`` (None for ranks that read
    no data, e.g. PS servers).

    Sums only what adds up over ranks (``rows``, ``bad_lines``, ``positives``: the label-1
    rows among ``rows``, and of the partitioned readers ``dropped_rows`` (the remainder of each
    epoch no rank trains on), ``refilled_rows``, ``bad_parts``, ``rows_read``: each rank counts
    its own share); a figure no rank reports is left out, never shown as 0. Takes the data's own
    figures once (``kind``, ``path``, ``format``, ``data_lines``, ``parts``: every rank counts
    the whole data); keeps each rank's share and position apart in ``per_rank``, and up to 10 ``bad_line_examples`` of all ranks
    in line order. Returns {} when no rank read data.
    """
    readers = [s for s in per_rank if s]
    if not readers:
        return {}
    first = readers[0]
    combined = {k: first[k] for k in ("kind", "path", "format", "data_lines", "parts", "world_size",
                                      # streams: the same on every rank (the whole stream's)
                                      "rows_consumed", "rows_left", "files", "late_files",
                                      "bad_files", "rows_dropped", "last_id", "lag_rows", "lag_s")
                if k in first}
    for key in _ADDITIVE_DATA_STATS:
        if key in ("rows", "bad_lines") or any(key in s for s in readers):
            combined[key] = int(sum(int(s.get(key, 0)) for s in readers))
    if "rows_consumed" in first:    # a stream: every rank reads every line, and counts it
        combined["bad_lines"] = int(first.get("bad_lines", 0))
    examples = list(dict.fromkeys(e for s in readers for e in s.get("bad_line_examples", [])))
    combined["bad_line_examples"] = sorted(examples, key=_line_of_example)[:_DATA_EXAMPLES]
    combined["per_rank"] = [{k: s[k] for k in _PER_RANK_DATA_STATS if k in s} for s in readers]
    caches = [s["cache"] for s in readers if "cache" in s]
    if caches:                      # the parsed-parts cache (hybridps.data.parsed_cache)
        combined["cache"] = {"directory": caches[0]["directory"],
                             **{k: int(sum(c[k] for c in caches))
                                for k in ("hits", "misses", "bytes_read", "bytes_written")},
                             "enabled_on_every_rank": all(c["enabled"] for c in caches)}
    truncated = {}
    for s in readers:               # ids dropped from lists longer than max_len, as read
        for name, count in s.get("truncated_ids", {}).items():
            truncated[name] = truncated.get(name, 0) + int(count)
    if truncated:
        combined["truncated_ids"] = truncated
    return combined


def _line_of_example(example):
    match = _LINE_OF_EXAMPLE.search(example)
    return int(match.group(1)) if match else 0


def skipped_lines_summary(combined, shown=3):
    """The one-line console summary of skipped malformed lines, or None when none was skipped."""
    if not combined or not combined.get("bad_lines"):
        return None
    path = combined.get("path", "?")
    examples = [e[len(path) + 2:] if e.startswith(f"{path}, ") else e
                for e in combined["bad_line_examples"][:shown]]
    more = combined["bad_lines"] - len(examples)
    return (f"data: skipped {combined['bad_lines']} malformed line(s) of {combined.get('data_lines', '?')} "
            f"in {path} (on_bad_line=skip; {combined['rows']} rows are used), e.g. "
            + "; ".join(examples) + (f"; and {more} more (data_stats in the metrics)" if more > 0 else ""))


def data_file_differences(fingerprints):
    """A message naming the ranks whose data file differs from rank 0's (size or content), or
    None; ``fingerprints`` per rank from ``dataset.fingerprint()`` (None: reads no file)."""
    readers = [(r, f) for r, f in enumerate(fingerprints) if f]
    if not readers:
        return None
    keys = ("file_bytes", "content_bytes", "content_blake2b", "data_lines")
    first_rank, first = readers[0]
    odd = [(r, f) for r, f in readers if any(f[k] != first[k] for k in keys)]
    if not odd:
        return None

    def describe(rank, f):
        return (f"rank {rank}: {f['file_bytes']} bytes on disk, {f['data_lines']} data lines, "
                f"content blake2b {f['content_blake2b'][:16]}")

    return (f"the data file {first['path']} is not the same file on every rank ("
            + "; ".join([describe(first_rank, first)] + [describe(r, f) for r, f in odd[:4]])
            + "): every rank must read identical data (a node-local copy that differs, or a file "
              "still being written?)")


def small_share_warning(combined, batch_size, steps):
    """A warning when ``batch_size`` exceeds a rank's share of the file (every batch then
    repeats rows), with the number of epochs the run reads; None otherwise."""
    shares = [(p["rank"], p["rows"]) for p in (combined or {}).get("per_rank", []) if p.get("rows")]
    if not shares:
        return None
    rank, rows = min(shares, key=lambda share: share[1])
    if batch_size <= rows:
        return None
    return (f"warning: batch_size {batch_size} is larger than rank {rank}'s share of "
            f"{combined.get('path')} ({rows} rows of {combined.get('data_lines')} data lines over "
            f"{counted(len(combined['per_rank']), 'rank')}): every batch repeats each row about "
            f"{batch_size / rows:.0f} times, and {steps} steps read the share "
            f"{steps * batch_size / rows:.0f} times (epochs). Use a smaller batch_size, fewer ranks "
            f"or more data.")
