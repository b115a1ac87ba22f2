"""Report helpers shared by the benchmark runners of ``hybridps bench``.

Each runner measures something and writes the same three artifacts to its output directory:
a JSON file (the numbers), a markdown table (for humans and PR descriptions) and a PNG bar
chart. The helpers here know nothing about any particular benchmark. matplotlib is imported
only when a chart is drawn, so importing this module stays cheap. :func:`stop_processes` ends
the processes a runner started (servers, training jobs, joiners, supervisors);
:func:`free_port` and :func:`http_json` start and ask the ``hybridps serve`` they follow, and
:func:`stream_covers` says whether the stream position it reports has consumed a file.
"""
import json
import os
import platform
import socket
import subprocess
import sys
import urllib.request
from importlib import metadata


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path``, creating the parent directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _format_cell(value, fmt):
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    return format(value, fmt)


def markdown_table(rows, columns):
    """A GitHub-flavoured markdown table of ``rows`` (dicts).

    Args:
        rows: list of dicts, one per table row.
        columns: list of ``(key, header, fmt)``; ``fmt`` is a format spec such as ``".2f"`` or
            ``",d"`` (``""`` for ``str()``), or a callable value -> str. Missing or None
            values print as ``-``.
    Returns:
        the table as a string, one line per row, without a trailing newline.
    """
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (_format_cell(row.get(key), fmt) for key, _, fmt in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(path, groups, series, title, ylabel):
    """Save a grouped bar chart as PNG (matplotlib, Agg backend; pyplot state is not touched).

    Args:
        path: output file.
        groups: labels of the groups along the x axis.
        series: dict ``name -> list of values`` (one value per group); one bar colour per name.
        title, ylabel: chart title and y-axis label.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(series)
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(names)) / 2 + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        offsets = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(offsets, series[name], width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def bench_environment(packages=("hybridps", "numpy", "pandas")):
    """Where a benchmark ran: CPU count and model, OS, Python and package versions.

    Package versions come from the installed distributions' metadata (nothing is imported);
    a package that is not installed is reported as None.
    """
    env = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": sys.implementation.name,
    }
    for name in packages:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    return env


def stop_processes(*processes, timeout=30):
    """Terminate every started process that still runs (None: never started), killing one
    that has not ended ``timeout`` seconds after its SIGTERM."""
    for proc in processes:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port():
    """A TCP port of 127.0.0.1 free at this moment (for a server a runner starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, body=None, timeout=30):
    """The JSON answer of GET ``url`` (POST of ``body`` as JSON when given)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stream_covers(position, name):
    """Whether a directory stream's position (hybridps.data.stream) has consumed file ``name``."""
    if not isinstance(position, dict):
        return False
    done = position.get("consumed_through")
    return done is not None and done >= name
