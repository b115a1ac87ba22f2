"""After a multi-host job failed: which host was lost, and which ranks ran there.

What lives here: the rank map line (rank 0 prints it at start when the ranks run on more than
one host, hybridps.comm; :func:`format_rank_map` / :func:`parse_rank_map`) and
:class:`FailureScanner`, which ``hybridps launch`` feeds with the launcher's stderr as it
passes it through unchanged (hybridps.launch.run_plan). The scanner recognizes that line and
Open MPI's report of a lost daemon; :meth:`FailureScanner.summary` turns it into a line that
names the host and its ranks, so a node that dies (its daemon and ranks killed at once) or
drops off the network is reported as such: Open MPI names only the node. (A rank that dies
alone is named by Open MPI itself: "process rank N ... on node X exited on signal S".) For the
supervisor of elastic restarts (hybridps.supervisor) it also keeps rank 0's last ``step N``
progress line (and when it was read, by the clock it is given) and the last error line.
Pure text processing: no MPI, no processes.
"""
import re

RANK_MAP_PREFIX = "[hybridps] ranks per host:"

_RANK_MAP = re.compile(re.escape(RANK_MAP_PREFIX) + r"\s*(.*)$")
_LOST_DAEMON = re.compile(r"ORTE has lost communication with a remote daemon")
_REMOTE_DAEMON = re.compile(r"Remote daemon:\s*\S+\s+on node\s+(\S+)")
_STEP_LINE = re.compile(r"^step (\d+)\b")                     # hybridps.metrics.progress
_ERROR_LINE = re.compile(r"(?:^|\] )error: |\b[A-Z]\w*(?:Error|Exception): |exited on signal \d+")


def rank_ranges(ranks):
    """[0, 1, 2, 5] -> "0-2,5"."""
    ranks = sorted(ranks)
    if not ranks:
        return ""
    parts, start = [], ranks[0]
    for previous, current in zip(ranks, ranks[1:] + [None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(parts)


def _expand(text):
    ranks = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            ranks += list(range(int(low), int(high or low) + 1))
    return ranks


def format_rank_map(host_of_rank):
    """The line rank 0 prints: ``[hybridps] ranks per host: h0=0-1 h1=2-3`` (hosts in rank order)."""
    by_host = {}
    for rank, host in enumerate(host_of_rank):
        by_host.setdefault(host, []).append(rank)
    return f"{RANK_MAP_PREFIX} " + " ".join(f"{h}={rank_ranges(r)}" for h, r in by_host.items())


def parse_rank_map(line):
    """{host: [ranks]} from a rank map line, or None when the line is not one."""
    match = _RANK_MAP.search(line)
    if not match:
        return None
    result = {}
    for item in match.group(1).split():
        host, _, ranks = item.rpartition("=")
        if host:
            result[host] = _expand(ranks)
    return result


class FailureScanner:
    """Reads a job's stderr (any chunks) and remembers what says which host or rank failed."""

    def __init__(self, clock=None):
        self.rank_map = None            # {host: [ranks]} from hybridps' line
        self.lost_hosts = []            # hosts whose Open MPI daemon was lost
        self.clock = clock              # () -> seconds, to time the step lines (None: not timed)
        self.first_step = self.last_step = None       # from rank 0's "step N" lines
        self.first_step_at = self.last_step_at = None
        self.last_error = None          # the last line that reads as an error
        self._partial = ""
        self._in_lost_daemon = False

    def feed(self, text):
        """Scan a chunk of output (lines may be split across chunks)."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def close(self):
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line):
        step = _STEP_LINE.match(line)
        if step:
            now = self.clock() if self.clock is not None else None
            if self.first_step is None:
                self.first_step, self.first_step_at = int(step.group(1)), now
            self.last_step, self.last_step_at = int(step.group(1)), now
            return
        if _ERROR_LINE.search(line):
            self.last_error = line.strip()
        rank_map = parse_rank_map(line)
        if rank_map:
            self.rank_map = rank_map
            return
        if _LOST_DAEMON.search(line):
            self._in_lost_daemon = True
            return
        match = _REMOTE_DAEMON.search(line)
        if match and self._in_lost_daemon:
            if match.group(1) not in self.lost_hosts:
                self.lost_hosts.append(match.group(1))
            self._in_lost_daemon = False

    def ranks_on(self, host):
        """Ranks of ``host`` per the rank map, or None when it is not known."""
        if self.rank_map is None:
            return None
        return self.rank_map.get(host, [])

    def summary(self, exit_code):
        """Lines for the user after the job ended with ``exit_code`` ([] when nothing to add)."""
        self.close()
        if exit_code == 0:
            return []
        return [f"host {host} was lost: Open MPI's daemon there stopped answering (the node "
                f"died, or its network went down); {self._ranks_text(host)}. The job ended "
                f"with exit code {exit_code}." for host in self.lost_hosts]

    def _ranks_text(self, host):
        ranks = self.ranks_on(host)
        if ranks is None:
            return "which ranks ran there is not known (the job failed before hybridps printed its rank map)"
        if not ranks:
            return "no rank of this job ran there"
        word = "rank" if len(ranks) == 1 else "ranks"
        return f"{word} {rank_ranges(ranks)} ran there"
