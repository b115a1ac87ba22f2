"""The progress line of rank 0: a bar on a terminal, a log line every ``log_every`` steps otherwise.

``--no-progress`` (``progress: false``) turns off this line only; what the run reports besides
it (the ``eval after step N`` lines, warnings, the summary) prints either way."""
import sys
import time


class Progress:
    """A progress bar on a terminal, periodic log lines otherwise (rank 0 only).

    ``total`` None (a run without a known end): log lines only. ``note``: a callable whose text
    ends each line (a data source's progress_note: a stream's rows/s and lag; None adds nothing)."""

    def __init__(self, total, enabled, log_every, stream=sys.stderr, note=None):
        self.total = total
        self.enabled = enabled
        self.log_every = log_every
        self.stream = stream
        self.note = note
        self.tty = enabled and total is not None and hasattr(stream, "isatty") and stream.isatty()
        self.started = time.perf_counter()

    def update(self, step, loss, samples_per_s):
        if not self.enabled:
            return
        done = step + 1
        text = self.note() if self.note is not None else None
        note = f" {text}" if text else ""
        if self.tty:
            width = 30
            filled = int(width * done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                              f"rank-0 loss {loss:.4f} {samples_per_s:,.0f} samples/s{note}")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done % self.log_every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.started
            of = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"step {done}{of} rank-0 loss {loss:.4f} "
                              f"{samples_per_s:,.0f} samples/s elapsed {elapsed:.1f}s{note}\n")
            self.stream.flush()
