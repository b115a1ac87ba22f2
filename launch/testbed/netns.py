#!/usr/bin/env python3
"""A multi-host test bed on one machine: network namespaces as hosts, a bridge as the switch.

What lives here: :class:`TestBed`, which creates N "hosts" (network namespaces) with one veth
link each to a bridge in a switch namespace of its own, addresses from 198.18.0.0/15 (the range
set aside for network test beds, RFC 2544), per-link bandwidth (tbf) and latency (netem, where
the kernel has it), a hostfile and the environment Open MPI needs to run across them (its
rsh agent replaced by ``rsh-agent`` next to this file, TCP between hosts), link and host
failures, and a teardown that removes everything it made, also after a failed test; plus
:func:`cleanup_leftovers` for what a crashed run left behind. Only the standard library is
used (the tests and ``hybridps bench scale`` load this file; it also runs as a script, see
``--help``). What does not live here: MPI or hybridps code.

Isolation: the root namespace is not touched (no interface, route, address, sysctl or
firewall rule is added there; the veth ends are created directly inside the namespaces). Each
host namespace has its address and the one link route of its /24, no default route; the
switch namespace has the bridge and no address at all. So no packet can go anywhere but a host
of this bed (and each namespace's own loopback). Names carry a prefix unique to the run
(``hps<pid>-<n>``: namespaces ``<prefix>-h<i>`` and ``<prefix>-sw``, run directory
``/tmp/<prefix>-testbed-*``, a Slurm on the bed in ``/var/tmp/<prefix>-slurm-*``); interface names live inside the namespaces (``eth0`` on a host,
``p<i>`` and ``br0`` on the switch), so two runs cannot collide.

Links: host i's ``eth0`` is shaped on egress (upload) and the switch port ``p<i>`` on egress
(download), both with tbf at the link rate: a full-duplex host NIC. Latency (one way, host to
host) is a netem delay on the host's egress; a kernel without sch_netem (as the CI machine
kind: ``CONFIG_NET_SCH_NETEM`` is not set and there are no modules) cannot add it, and
``TestBed.latency_applied`` is then False (the links keep the veth's own latency, which
:meth:`TestBed.measure_rtt_us` measures).

Hosts: every command runs through ``rsh-agent HOST COMMAND`` (what ssh is on a cluster): in the
host's network namespace, with its own host name (UTS namespace) and a private mount namespace
that binds the bed's hosts file over /etc/hosts. Hosts share the file system (one machine)
unless :meth:`TestBed.private_dir` gives one of them its own directory at a path. A host can be
turned off and on (:meth:`TestBed.power`): off, its processes are killed and nothing starts there.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(HERE, "rsh-agent")
SUPERNET = (198, 18)                 # 198.18.0.0/15: 512 /24 subnets
PREFIX_PATTERN = re.compile(r"^(hps(\d+)-\d+)-(h\d+|sw)$")
RUN_DIR_PATTERN = re.compile(r"^(hps(\d+)-\d+)-(testbed|slurm)-")   # in /tmp or /var/tmp
# What jobs on a bed's hosts leave in /tmp when killed: Open MPI's session directories and the
# hybridps watchdog's state directories, both named after the bed's host names.
HOST_DIR_PATTERN = re.compile(r"^(?:ompi\.|hybridps-watchdog-)(hps(\d+)-\d+)-h\d+[.-]")
_COUNTER = [0]


class TestBedError(RuntimeError):
    """The test bed cannot be built here (not root, no ip/tc, no netns) or a step failed."""


def _run(argv, check=True, timeout=30):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise TestBedError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason():
    """Why a test bed cannot be built on this machine, or None when it can (tests skip on it)."""
    if os.geteuid() != 0:
        return "the namespace test bed needs root (ip netns add, veth, tc)"
    for tool in ("ip", "tc", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y iproute2 util-linux)"
    probe = f"hps{os.getpid()}-0-sw"          # matches PREFIX_PATTERN: a crash here is cleaned up too
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"ip netns add does not work here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _format_rate(gbit):
    return f"{gbit * 1000:g}mbit"


class TestBed:
    """N hosts in network namespaces on one bridge; a context manager (teardown on exit).

    Example::

        with TestBed(hosts=2, slots=2, bandwidth_gbit=1.0, latency_ms=0.2) as bed:
            subprocess.run(bed.command(bed.hosts[0], ["mpirun", "--hostfile", bed.hostfile,
                                                      "-np", "4", "hostname"]),
                           env=dict(os.environ, **bed.mpi_env()))

    Args:
        hosts: number of hosts (namespaces).
        slots: MPI slots per host written to the hostfile.
        bandwidth_gbit: link rate in Gbit/s (None: unshaped veth).
        latency_ms: one-way host-to-host delay in ms (None or 0: none; needs sch_netem).
        prefix: name prefix (default ``hps<pid>-<n>``, unique per process and bed).
    """

    def __init__(self, hosts=2, slots=1, bandwidth_gbit=None, latency_ms=None, prefix=None):
        if hosts < 1:
            raise ValueError(f"hosts must be >= 1, got {hosts}")
        if hosts > 250:
            raise ValueError(f"at most 250 hosts per bed (one /24), got {hosts}")
        _COUNTER[0] += 1
        self.prefix = prefix or f"hps{os.getpid()}-{_COUNTER[0]}"
        if not PREFIX_PATTERN.match(f"{self.prefix}-sw"):
            raise ValueError(f"prefix {self.prefix!r} must look like hps<digits>-<digits> "
                             f"(cleanup_leftovers matches only that)")
        self.num_hosts = hosts
        self.slots = slots
        self.bandwidth_gbit = bandwidth_gbit
        self.latency_ms = latency_ms
        self.latency_applied = False
        self.hosts = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self.switch = f"{self.prefix}-sw"
        index = (os.getpid() * 8 + _COUNTER[0]) % 512
        self.subnet_prefix = f"{SUPERNET[0]}.{SUPERNET[1] + index // 256}.{index % 256}"
        self.subnet = f"{self.subnet_prefix}.0/24"
        self.addresses = {h: f"{self.subnet_prefix}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.run_dir = None
        self.hostfile = None
        self._created = []           # namespaces made, in order
        self._private = {}           # host -> [(source, target)]

    # ---------------------------------------------------------------- building and removing
    def __enter__(self):
        return self.up()

    def __exit__(self, exc_type, exc, tb):
        self.down()
        return False

    def up(self):
        """Create the namespaces, links, addresses, shaping, hostfile; returns self.

        Raises:
            TestBedError: not possible here (the reason says why); whatever was made is removed.
        """
        reason = unavailable_reason()
        if reason:
            raise TestBedError(reason)
        try:
            self.run_dir = tempfile.mkdtemp(prefix=f"{self.prefix}-testbed-")
            os.chmod(self.run_dir, 0o755)
            self._add_namespace(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for i, host in enumerate(self.hosts):
                self._add_namespace(host)
                _run(["ip", "link", "add", "eth0", "netns", host, "type", "veth",
                      "peer", "name", f"p{i}", "netns", self.switch])
                _run(["ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up"])
                _run(["ip", "-n", host, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0"])
                _run(["ip", "-n", host, "link", "set", "eth0", "up"])
            self.shape(self.bandwidth_gbit, self.latency_ms)
            self._write_config()
        except BaseException:
            self.down()
            raise
        return self

    def _add_namespace(self, name):
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # IPv6 off: no router solicitations or DAD chatter, and MPI sees one address per host
        _run(["ip", "netns", "exec", name, "sh", "-c",
              "for k in all default lo; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; done"],
             check=False)

    def down(self):
        """Kill every process left in the bed's namespaces, delete them and the run directory.

        Idempotent and never raises (teardown after a failed test must not hide the failure);
        returns the list of problems met, if any.
        """
        problems = []
        for name in reversed(self._created):
            problems += _remove_namespace(name)
        self._created = []
        tmp = tempfile.gettempdir()
        for entry in os.listdir(tmp):
            match = HOST_DIR_PATTERN.match(entry)
            if match and match.group(1) == self.prefix:
                shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        return problems

    def _write_config(self):
        d = self.run_dir
        with open(os.path.join(d, "etc-hosts"), "w") as fh:
            fh.write("127.0.0.1 localhost\n")
            for host in self.hosts:
                fh.write(f"{self.addresses[host]} {host}\n")
        for host in self.hosts:
            os.makedirs(os.path.join(d, "hosts", host), exist_ok=True)
            with open(os.path.join(d, "hosts", host, "netns"), "w") as fh:
                fh.write(host + "\n")
        self.hostfile = self.write_hostfile(self.slots)
        with open(os.path.join(d, "testbed.json"), "w") as fh:
            json.dump(self.describe(), fh, indent=2)

    def write_hostfile(self, slots=None, hosts=None, name="hostfile"):
        """An Open MPI hostfile (``HOST slots=N`` lines) of ``hosts`` (default all); its path."""
        path = os.path.join(self.run_dir, name)
        with open(path, "w") as fh:
            for host in hosts or self.hosts:
                fh.write(f"{host} slots={slots or self.slots}\n")
        return path

    def describe(self):
        """The bed as a dict (hosts, addresses, links): written to testbed.json."""
        return {"prefix": self.prefix, "hosts": self.hosts, "addresses": self.addresses,
                "subnet": self.subnet, "switch": self.switch, "run_dir": self.run_dir,
                "hostfile": self.hostfile, "slots": self.slots,
                "bandwidth_gbit": self.bandwidth_gbit, "latency_ms": self.latency_ms,
                "latency_applied": self.latency_applied}

    # ---------------------------------------------------------------- links
    def shape(self, bandwidth_gbit=None, latency_ms=None, hosts=None):
        """(Re)set the rate and delay of the links of ``hosts`` (default all).

        Rate: tbf on the host's egress and on the switch port's egress (both directions).
        Delay: netem on the host's egress when the kernel has sch_netem; otherwise
        ``latency_applied`` stays False. None / 0 removes the shaping.
        """
        self.bandwidth_gbit, self.latency_ms = bandwidth_gbit, latency_ms
        applied = True
        for host in hosts or self.hosts:
            port = f"p{self.hosts.index(host)}"
            for ns, dev in ((host, "eth0"), (self.switch, port)):
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            parent = ["root"]
            if latency_ms:
                proc = _run(["tc", "-n", host, "qdisc", "add", "dev", "eth0", "root", "handle", "1:",
                             "netem", "delay", f"{latency_ms}ms", "limit", "100000"], check=False)
                if proc.returncode == 0:
                    parent = ["parent", "1:1"]
                else:
                    applied = False
            if bandwidth_gbit:
                for ns, dev, where in ((host, "eth0", parent), (self.switch, port, ["root"])):
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev] + where + ["handle", "10:", "tbf"]
                         + _tbf_args(bandwidth_gbit))
        self.latency_applied = bool(latency_ms) and applied
        if self.run_dir:
            with open(os.path.join(self.run_dir, "testbed.json"), "w") as fh:
                json.dump(self.describe(), fh, indent=2)

    def set_link(self, host, up):
        """Take ``host``'s link down (its switch port, as a pulled cable) or up again."""
        port = f"p{self.hosts.index(host)}"
        _run(["ip", "-n", self.switch, "link", "set", port, "up" if up else "down"])

    def link_bytes(self, host):
        """(bytes sent, bytes received) by ``host``'s eth0 so far (kernel counters)."""
        stats = {}
        for what in ("tx_bytes", "rx_bytes"):
            out = _run(["ip", "netns", "exec", host, "cat", f"/sys/class/net/eth0/statistics/{what}"])
            stats[what] = int(out.stdout.strip())
        return stats["tx_bytes"], stats["rx_bytes"]

    # ---------------------------------------------------------------- hosts and processes
    def private_dir(self, host, target, source):
        """Make ``host`` see directory ``source`` at path ``target`` (others keep the shared
        one): for tests of directories that are not shared between hosts. Applies to commands
        started after the call."""
        self._private.setdefault(host, []).append((os.path.abspath(source), os.path.abspath(target)))
        with open(os.path.join(self.run_dir, "hosts", host, "mounts"), "w") as fh:
            for src, dst in self._private[host]:
                if " " in src or " " in dst:
                    raise ValueError("private_dir paths must not contain spaces")
                fh.write(f"{src} {dst}\n")

    def command(self, host, argv):
        """argv that runs ``argv`` on ``host`` (through the rsh agent, as mpirun does)."""
        return [AGENT, host, shlex.join([str(a) for a in argv])]

    def env(self):
        """Variables the rsh agent needs (give them to every command started on the bed)."""
        return {"HYBRIDPS_TESTBED_DIR": self.run_dir}

    def mpi_env(self, keepalive_s=5):
        """Environment for Open MPI on this bed: the rsh agent, no tree spawn, TCP between
        hosts only on the bed's subnet (shared memory within a host), TCP keepalive on the
        daemons' connections so that a host that vanishes (link down) is noticed in about
        ``keepalive_s`` + 3 s, and a 32 MiB eager limit for the TCP transport (``hybridps
        launch`` sets 4 MiB on several hosts: a message above the eager limit goes by
        rendezvous, and two-way traffic of such messages ran at 0.54 of a 1 Gbit/s link; 32 MiB
        also covers the 7.7 MB allgather blocks of the TF+Horovod baseline)."""
        env = dict(self.env())
        mca = {"plm_rsh_agent": AGENT, "plm_rsh_no_tree_spawn": "1",
               "pml": "ob1", "btl": "self,vader,tcp",
               "btl_tcp_if_include": self.subnet, "oob_tcp_if_include": self.subnet,
               "oob_tcp_keepalive_time": str(keepalive_s), "oob_tcp_keepalive_intvl": "1",
               "oob_tcp_keepalive_probes": "3",
               "btl_tcp_eager_limit": str(32 << 20), "btl_tcp_max_send_size": str(32 << 20)}
        env.update({f"OMPI_MCA_{k}": v for k, v in mca.items()})
        return env

    def pids(self, host):
        """PIDs of every process in ``host``'s network namespace."""
        return _netns_pids(host)

    def kill_host(self, host, sig=signal.SIGKILL):
        """Send ``sig`` to every process on ``host`` (a node dying); returns the PIDs hit."""
        hit = []
        for pid in self.pids(host):
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except ProcessLookupError:
                pass
        return hit

    def power(self, host, on):
        """Turn ``host`` off (every process there killed, and nothing starts there until it
        is turned on: its rsh agent fails as ssh to a dead node does) or on again."""
        marker = os.path.join(self.run_dir, "hosts", host, "off")
        if on:
            if os.path.exists(marker):
                os.remove(marker)
            return []
        with open(marker, "w"):
            pass
        return self.kill_host(host)

    def measure_rtt_us(self, src=0, dst=1, rounds=200):
        """Median round trip in microseconds of a 1-byte TCP ping-pong between two hosts."""
        if self.num_hosts < 2:
            return None
        port = 5201
        server = subprocess.Popen(
            self.command(self.hosts[dst], [sys.executable, "-c", _PONG, str(port), str(rounds)]),
            env=dict(os.environ, **self.env()), stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()          # "ready"
            out = subprocess.run(
                self.command(self.hosts[src], [sys.executable, "-c", _PING, self.addresses[self.hosts[dst]],
                                               str(port), str(rounds)]),
                env=dict(os.environ, **self.env()), capture_output=True, text=True, timeout=60)
            return float(out.stdout.strip()) if out.returncode == 0 else None
        finally:
            server.wait(timeout=30)


_PONG = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[2])):
    c.sendall(c.recv(1))
"""
_PING = """
import socket, sys, time, statistics
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e6)
"""


def _tbf_args(gbit):
    """tbf at ``gbit``: a burst of 0.5 ms at the rate, at least 256 KiB, so that a 64 KiB GSO
    packet passes whole (with a burst of 64 KiB tbf cut every one into MTU-sized segments and
    the CPU, not the rate, limited two-way traffic to 0.59 Gbit/s each way at 1 Gbit/s; with
    256 KiB: 0.95); and a 20 ms queue (2 ms lost packets to incast at 4 hosts, stalling TCP
    for its 200 ms minimum retransmission timeout)."""
    burst = max(256 * 1024, int(gbit * 1e9 / 8 * 0.0005))
    return ["rate", _format_rate(gbit), "burst", str(burst), "latency", "20ms"]


def _netns_pids(name):
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _remove_namespace(name):
    """Kill the processes in namespace ``name`` (its own, by PID), then delete it."""
    problems = []
    for attempt in range(20):
        pids = _netns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05 * (attempt + 1))
    else:
        problems.append(f"processes {_netns_pids(name)} survived in {name}")
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and "No such file" not in proc.stderr:
        problems.append(f"ip netns del {name}: {proc.stderr.strip()}")
    return problems


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(include_live=False):
    """Namespaces and run directories of test beds (names matching ``hps<pid>-<n>-...``) whose
    creating process is gone (or all of them with ``include_live``): (namespaces, directories)."""
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    namespaces = [n for n in names if PREFIX_PATTERN.match(n)
                  and (include_live or not _alive(int(PREFIX_PATTERN.match(n).group(2))))]
    directories = []
    for parent in sorted({tempfile.gettempdir(), "/var/tmp"}):
        for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
            match = RUN_DIR_PATTERN.match(entry) or HOST_DIR_PATTERN.match(entry)
            if match and (include_live or not _alive(int(match.group(2)))):
                directories.append(os.path.join(parent, entry))
    return namespaces, directories


def cleanup_leftovers(include_live=False):
    """Remove what crashed test-bed runs left (see :func:`leftovers`); returns what was removed."""
    namespaces, directories = leftovers(include_live)
    for name in namespaces:
        _remove_namespace(name)
    for path in directories:
        shutil.rmtree(path, ignore_errors=True)
    return namespaces, directories


# -------------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="launch/testbed/netns.py",
        description="Network-namespace multi-host test bed (root). 'run' builds a bed, runs a "
                    "command on its first host with the hostfile and Open MPI settings, and "
                    "removes the bed; 'cleanup' removes leftovers of crashed runs.")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="build a bed, run COMMAND on host 0, tear the bed down")
    run.add_argument("--hosts", type=int, default=2)
    run.add_argument("--slots", type=int, default=1, help="MPI slots per host in the hostfile")
    run.add_argument("--bandwidth-gbit", type=float)
    run.add_argument("--latency-ms", type=float)
    run.add_argument("command", nargs=argparse.REMAINDER,
                     help="-- then the command; {hostfile} in it is replaced by the hostfile's path")
    clean = sub.add_parser("cleanup", help="remove namespaces and directories of crashed runs")
    clean.add_argument("--all", action="store_true",
                       help="also beds whose creating process still runs (stop those first)")
    sub.add_parser("list", help="list test-bed namespaces and run directories")
    args = parser.parse_args(argv)
    if args.action == "list":
        namespaces, directories = leftovers(include_live=True)
        print("\n".join(namespaces + directories) or "no test-bed namespaces or directories")
        return 0
    if args.action == "cleanup":
        namespaces, directories = cleanup_leftovers(include_live=args.all)
        print(f"removed {len(namespaces)} namespace(s) and {len(directories)} directorie(s)"
              + "".join(f"\n  {x}" for x in namespaces + directories))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: give a command after --")
    with TestBed(args.hosts, args.slots, args.bandwidth_gbit, args.latency_ms) as bed:
        sys.stderr.write(f"testbed: {args.hosts} hosts {', '.join(f'{h}={a}' for h, a in bed.addresses.items())}; "
                         f"hostfile {bed.hostfile}; bandwidth {args.bandwidth_gbit or 'unshaped'} Gbit/s; "
                         f"latency {'%g ms' % args.latency_ms if bed.latency_applied else 'not added'}\n")
        command = [c.replace("{hostfile}", bed.hostfile) for c in command]
        proc = subprocess.run(bed.command(bed.hosts[0], command), env=dict(os.environ, **bed.mpi_env()))
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
