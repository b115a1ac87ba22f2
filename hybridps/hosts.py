"""Where ranks run: local rank and size from the launcher's environment, Slurm node lists,
host lists and hostfiles.

What lives here: pure functions of environment variables, strings and files (no MPI), shared by
hybridps.comm (local rank and size of every rank), hybridps.launch (building commands) and
hybridps.doctor. What does not: starting anything (hybridps.launch).
"""
import re

from hybridps.errors import ConfigError


def local_rank_and_size(environ, rank=0, size=1):
    """Local rank and local size of this process, from whichever launcher set them.

    Open MPI (``OMPI_COMM_WORLD_LOCAL_*``, also under srun with PMIx) is checked first, then
    MPICH / Intel MPI Hydra (``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``), generic PMI
    (``PMI_LOCAL_RANK``, ``PMI_LOCAL_SIZE``), then Slurm (``SLURM_LOCALID`` with the tasks on
    this node from ``SLURM_TASKS_PER_NODE`` and ``SLURM_NODEID``). ``mpirun`` inside a Slurm
    job inherits the batch script's ``SLURM_*`` variables, hence the order.

    Args:
        environ: a mapping like os.environ.
        rank, size: the global rank and size, returned when no launcher variable is present.
    Returns:
        (local_rank, local_size, source) where source names the variable family used
        ("openmpi", "hydra", "pmi", "slurm" or "none").
    """
    for source, rank_var, size_var in (("openmpi", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                                       ("hydra", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                                       ("pmi", "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE")):
        local_rank = _int_or_none(environ.get(rank_var))
        if local_rank is not None:
            local_size = _int_or_none(environ.get(size_var))
            return local_rank, local_size if local_size else size, source
    local_rank = _int_or_none(environ.get("SLURM_LOCALID"))
    if local_rank is not None:
        local_size = slurm_tasks_on_node(environ)
        return local_rank, local_size if local_size else size, "slurm"
    return rank, size, "none"


def slurm_tasks_on_node(environ):
    """Tasks Slurm places on this node: ``SLURM_TASKS_PER_NODE`` (e.g. ``2(x3),1``) indexed by
    ``SLURM_NODEID``, else ``SLURM_NTASKS_PER_NODE``; None when neither is set."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
            if not match:
                counts = []
                break
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = _int_or_none(environ.get("SLURM_NODEID")) or 0
        if counts:
            return counts[min(node, len(counts) - 1)]
    return _int_or_none(environ.get("SLURM_NTASKS_PER_NODE"))


def expand_nodelist(nodelist):
    """Expand a Slurm host list: ``node[01-03,07],gpu1`` -> node01 node02 node03 node07 gpu1."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist or ""):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            width = len(low)
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def parse_hosts(hosts):
    """``h1:2,h2:2`` or ``h1,h2`` -> [(host, slots or None)].

    Raises:
        ConfigError: an entry with a bad slot count.
    """
    parsed = []
    for item in (hosts or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, slots = item.partition(":")
        if slots and not slots.isdigit() or slots == "0":
            raise ConfigError(f"--hosts entry {item!r}: expected host or host:slots with slots >= 1")
        parsed.append((name, int(slots) if slots else None))
    return parsed


def parse_hostfile(path):
    """An MPI hostfile -> [(host, slots or None)].

    Lines are Open MPI's ``host [slots=N] [max_slots=M]`` or MPICH's ``host[:N]``; ``#``
    starts a comment, blank lines are skipped.

    Raises:
        ConfigError: the file cannot be read, has no host, or a line is malformed (the message
            names the file and the line).
    """
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"--hostfile {path}: cannot read it ({exc.strerror or exc})") from None
    parsed = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        name, _, slots = words[0].partition(":")
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key in ("slots", "cpu", "count"):
                slots = value
            elif key not in ("max_slots", "max-slots"):
                raise ConfigError(f"--hostfile {path} line {number}: unknown field {word!r} "
                                  f"(expected 'host slots=N' or 'host:N')")
        if slots and not slots.isdigit() or slots == "0" or not name:
            raise ConfigError(f"--hostfile {path} line {number}: {line!r}: expected 'host slots=N' "
                              f"(N >= 1) or 'host:N'")
        parsed.append((name, int(slots) if slots else None))
    if not parsed:
        raise ConfigError(f"--hostfile {path} lists no host")
    return parsed


def _int_or_none(value):
    value = (value or "").strip()
    return int(value) if value.isdigit() else None
