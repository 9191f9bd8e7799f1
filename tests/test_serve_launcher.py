"""`neo-serve up` as a user runs it: a process that starts Ray + Serve, prints the URL, serves,
and shuts everything down on Ctrl-C."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from checkpoints import build_tokenizer, make_neox
from conftest_serve import (abandoned_haproxy_dir, free_port, ray_serve_on_loopback, session_processes, start_haproxy,
                            user_environ)
from neo_serve.serve.config import DEMO_CHECKPOINT
from neo_serve.serve.ingress import HAPROXY_DIR_OWNER, HAPROXY_DIR_PARENT, HAPROXY_DIR_PREFIX, stop_haproxy_of
from neo_serve.serve.launcher import failure_message, local_cpu_threads
from neo_serve.serve.machine import available_cores
from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS

pytestmark = pytest.mark.timeout(300)


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _controller_environ(session_id: int) -> dict[str, str]:
    """The environment of the Serve controller among the processes of session `session_id`."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.info["cmdline"] or [""])[0].startswith("ray::ServeController") and \
                    os.getsid(proc.pid) == session_id:
                return proc.environ()
        except (psutil.Error, ProcessLookupError):
            continue
    raise AssertionError(f"no Serve controller in session {session_id}")


_HAPROXY_DIRS = os.path.join(HAPROXY_DIR_PARENT or tempfile.gettempdir(), HAPROXY_DIR_PREFIX)


def _haproxy_dirs() -> dict[int, str]:
    """{pid: private directory} of the HAProxy processes neo-serve's clusters run on this machine
    (other tests' clusters among them: the suite runs two groups of tests side by side)."""
    found = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        for arg in (proc.info["cmdline"] or []) if proc.info["name"] == "haproxy" else []:
            if arg.endswith("haproxy.cfg") and arg.startswith(_HAPROXY_DIRS):
                found[proc.pid] = os.path.dirname(os.path.dirname(arg))  # <dir>/<node id>/haproxy.cfg
    return found


def _haproxy_running_from(directory: str) -> list[int]:
    return sorted(pid for pid, where in _haproxy_dirs().items() if where == directory)


def _owner(directory: str) -> int | None:
    """The process that made a private HAProxy directory (the one whose Ray runs that HAProxy)."""
    try:
        return int(Path(directory, HAPROXY_DIR_OWNER).read_text())
    except (OSError, ValueError):
        return None


class UpProcess:
    """A running `neo-serve up` and what it printed so far (stdout and stderr, line by line)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=_reader, args=(process.stdout, self._lines), daemon=True)
        self._reader.start()
        self.output: list[str] = []

    def read_until(self, text: str, timeout: float) -> str:
        """The first printed line containing `text`, reading on until the output ends."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.output):
            assert self._reader.is_alive() or not self._lines.empty(), self.text()
            assert time.monotonic() < deadline, self.text()
            try:
                self.output.append(self._lines.get(timeout=1))
            except queue.Empty:
                pass
        return next(line for line in self.output if text in line)

    def read_to_end(self, timeout: float) -> str:
        """Everything printed, once the process has closed its output."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), self.text()
        while not self._lines.empty():
            self.output.append(self._lines.get())
        return self.text()

    def text(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def neo_serve_up(*args: str, env: dict[str, str]) -> Iterator[UpProcess]:
    """`neo-serve up ARGS` in its own process group; killed with what it started if still running."""
    process = subprocess.Popen([sys.executable, "-m", "neo_serve.cli", "up", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    try:
        yield UpProcess(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Ray starts HAProxy outside the process group: left running it would hold its ports and
        # fail the next cluster's HAProxy. Only this `up`'s (the other clusters' are not ours to stop).
        for directory in {where for where in _haproxy_dirs().values() if _owner(where) == process.pid}:
            stop_haproxy_of(directory)


def offline_text(checkpoint, prompt: str, max_tokens: int) -> str:
    """The greedy completion of the in-process engine (float32, as `up --dtype float32` serves)."""
    from neo_serve import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return LLM(str(checkpoint), dtype="float32").generate([prompt], params)[0].outputs[0].text


def readme_python_example() -> str:
    """The README's Python block that uses a Serve handle."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    [example] = [block for block in blocks if "get_app_handle" in block]
    return example


class StreamsInFlight:
    """`count` greedy streams of `max_tokens` tokens each, started on threads; returns once each
    has its first token. `finished()`: per stream (finish reason, tokens, whether [DONE] came)."""

    def __init__(self, base: str, headers: dict[str, str], *, count: int, max_tokens: int) -> None:
        self._started = threading.Barrier(count + 1, timeout=60)
        self._results: list[tuple[str | None, int, bool] | str] = []
        body = {"prompt": "def hello_world():", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        self._threads = [threading.Thread(target=self._stream, args=(base, headers, body), daemon=True)
                         for _ in range(count)]
        for thread in self._threads:
            thread.start()
        self._started.wait()

    def _stream(self, base: str, headers: dict[str, str], body: dict) -> None:
        reason, tokens, done, first = None, 0, False, True
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                        tokens += len(choice.get("token_ids") or [])
                        reason = choice.get("finish_reason") or reason
                        if first and tokens:
                            first = False
                            self._started.wait()
            self._results.append((reason, tokens, done))
        except Exception as exc:  # noqa: BLE001 - reported by finished()
            self._results.append(f"{type(exc).__name__}: {exc}")

    def finished(self) -> list:
        for thread in self._threads:
            thread.join(timeout=60)
        return self._results


def test_up_serves_until_ctrl_c(tmp_path):
    port, haproxy_stats_port, metrics_port = free_port(), free_port(), free_port()
    # The bundled demo when it is there (the default), else a tiny checkpoint named on the command line.
    demo = (DEMO_CHECKPOINT / "config.json").is_file()
    checkpoint = [] if demo else [str(make_neox(tmp_path / "tiny", build_tokenizer()))]
    name = "neo-demo" if demo else "tiny"
    # No ingress asked for: `auto`, which is HAProxy where ray[serve] brought its binary (Linux);
    # nor the local Serve settings (earlier tests' clusters put them in this process's environment).
    # API keys from the environment, as a container sets them: the router's replica reads them.
    env = {**user_environ(), "RAY_DEDUP_LOGS": "0", "RAY_SERVE_HAPROXY_STATS_PORT": str(haproxy_stats_port),
           "NEO_SERVE_API_KEYS": "first-key, second-key"}
    auth = {"Authorization": "Bearer second-key"}
    with neo_serve_up(*checkpoint, "--dtype", "float32", "--port", str(port), "--num-cpus", "4",
                      "--metrics-port", str(metrics_port), env=env) as up:
        up.read_until("Ctrl-C to stop", timeout=180)  # the banner's last line
        banner = up.text()
        assert f"http://127.0.0.1:{port}/v1" in banner and f"http://127.0.0.1:{port}/ui" in banner
        assert "ingress      haproxy" in banner
        # Serve warns that a loopback host won't take HAProxy's connections from other nodes; the
        # banner says why that does not matter for this one-node cluster.
        assert "note         Serve's warning about HTTPOptions.host='127.0.0.1'" in banner, banner
        # Serve's own start-up steps (controller, HAProxy manager) stay out of the way unless --verbose.
        assert "Deploying new version of Deployment" not in banner and "HAProxy started" not in banner, banner
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert f"metrics      {metrics_url}" in banner
        # With no --cpus-per-stage the one stage gets the machine's threads (2 on a 2-core machine),
        # and the replica that runs it says so when its stage is loaded.
        threads = local_cpu_threads(available_cores())
        assert f"threads      {threads} per stage" in banner
        # Where another process's ray.init finds this cluster ("auto" takes the first on the machine).
        pattern = r"ray address  (\S+)  \(handles from another process: RAY_ADDRESS=\1\)"
        [ray_address] = re.findall(pattern, banner)
        # Replica logs reach this process through Ray's log monitor.
        ready = up.read_until(f"pipeline for {name} ready:", timeout=30)
        assert f"'threads': {threads}}}" in ready, ready
        base = f"http://127.0.0.1:{port}"
        # HAProxy, not Serve's Python proxy, holds the port: its stats page shows its HTTP frontend.
        stats = httpx.get(f"http://127.0.0.1:{haproxy_stats_port}/stats;csv", timeout=10)
        assert stats.status_code == 200 and "http_frontend" in stats.text, stats.text[:500]
        # HAProxy's files, its admin socket among them, are in a directory only this user may
        # enter, not in Serve's shared /tmp/haproxy-serve (where the socket is anyone's).
        private = _haproxy_private_dir(up.process.pid)
        assert os.stat(private).st_mode & 0o777 == 0o700
        assert glob.glob(os.path.join(private, "*", "admin.sock"))
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        # The Serve settings for local clusters reached Serve's controller (a process of this cluster).
        controller_env = _controller_environ(up.process.pid)
        assert {key: controller_env.get(key) for key in LOCAL_SERVE_SETTINGS} == LOCAL_SERVE_SETTINGS
        assert httpx.get(f"{base}/v1/models").status_code == 401  # no key
        assert f"API docs     {base}/docs" in banner  # open: its Authorize button takes the key
        assert "swagger-ui" in httpx.get(f"{base}/docs", timeout=30).text
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", headers=auth).json()["data"]] == [name]
        body = httpx.post(f"{base}/v1/completions", json={"prompt": "def hello_world():", "max_tokens": 8,
                                                          "temperature": 0}, headers=auth, timeout=60).json()
        assert body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["text"] == offline_text(checkpoint[0] if checkpoint else DEMO_CHECKPOINT,
                                                          "def hello_world():", 8)
        # The README's handle example, run as a user runs it: from a process of its own, with the
        # address the banner printed (the test session may have a Ray of its own on this machine).
        example = readme_python_example()
        ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=120,
                             env={**user_environ(), "RAY_ADDRESS": ray_address})
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "'object': 'text_completion'" in ran.stdout and "'finish_reason': 'length'" in ran.stdout, ran.stdout
        # The banner's metrics URL serves the model's metrics (once Ray has exported them).
        deadline = time.monotonic() + 60
        while "ray_neo_serve_generation_tokens" not in httpx.get(metrics_url, timeout=10).text:
            assert time.monotonic() < deadline, "no neo-serve metrics at the banner's metrics URL"
            time.sleep(1)
        # SIGTERM, as `docker stop` or a Pod's end sends it: the same clean stop as Ctrl-C (ray.init's
        # own handler made it exit 15 at once, without "shutting down"), with 8 streams in flight:
        # they finish whole (the shutdown cut every one of them mid-stream, with no error event).
        streams = StreamsInFlight(base, auth, count=8, max_tokens=400)
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=180) == 0  # 30-60 s alone; the suite's other half shares the cores
        up.read_until("neo-serve: shutting down; requests in flight finish first", timeout=10)
        up.read_until("neo-serve: stopped", timeout=10)
        # Serve's controller went without Ray calling its shutdown a failed task (which it did at
        # every stop: "Task ServeController.graceful_shutdown failed ... killed by `ray.kill`").
        assert "failed" not in up.read_to_end(timeout=10).split("neo-serve: shutting down")[1], up.text()
        assert streams.finished() == [("length", 400, True)] * 8
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # HAProxy went with it
            httpx.get(f"http://127.0.0.1:{haproxy_stats_port}/stats", timeout=5)
        assert not os.path.exists(private)  # and its files


def test_up_on_a_joined_cluster_removes_only_its_app():
    """`neo-serve up --address` joins a cluster someone else runs: Ctrl-C drains and deletes its own
    application and leaves the cluster, its Serve and their applications running."""
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Keeper:
        async def __call__(self, request) -> str:
            return "kept"

    with ray_serve_on_loopback(num_cpus=8) as base:
        serve.run(Keeper.bind(), name="keeper", route_prefix="/keeper")
        address = ray.get_runtime_context().gcs_address
        with neo_serve_up("--address", address, "--app-name", "joined", "--no-playground", "--port", str(free_port()),
                          env=user_environ()) as up:
            up.read_until("Ctrl-C to stop", timeout=180)
            answer = httpx.post(f"{base}/v1/completions", json={"prompt": "def f(", "max_tokens": 4}, timeout=60)
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
            up.process.send_signal(signal.SIGINT)
            assert up.process.wait(timeout=90) == 0, up.text()
            up.read_until("neo-serve: stopped", timeout=10)
            assert "joined" not in serve.status().applications
            assert httpx.get(f"{base}/keeper", timeout=30).text == "kept"


def test_gpu_on_a_machine_without_one_is_one_line_not_a_wait():
    """Serve would wait for ever for GPUs a local cluster never gains, printing nothing."""
    with neo_serve_up("--gpu", "--stages", "2", "--port", str(free_port()), "--no-playground",
                      env={**user_environ(), "CUDA_VISIBLE_DEVICES": ""}) as up:  # no GPU, on any machine
        assert up.process.wait(timeout=120) == 2, up.text()
        up.read_until("neo-serve up: the app starts with pipelines needing 2 GPU(s) (neo-demo: 1 pipeline(s) x 2 "
                      "(--stages 2); --gpu puts each stage on one) and Ray sees no GPU on this machine", timeout=10)
        assert "neo-serve: deploying" not in up.text()


def test_ctrl_c_stops_up_while_its_app_cannot_be_placed():
    """Too few CPUs for the pipeline (`--num-cpus 1`: the router takes it): Serve waits for ever to
    place the pipeline, and a Ctrl-C that only set a flag left `neo-serve up` hanging until killed."""
    env = {**user_environ(), "RAY_DEDUP_LOGS": "0"}
    with neo_serve_up("--stages", "2", "--port", str(free_port()), "--num-cpus", "1", "--no-playground", "--verbose",
                      env=env) as up:
        # --verbose: Serve's controller tells its steps (the pipeline's deployment is started, then waits).
        up.read_until("Deploying new version of Deployment(name='Pipeline-neo-demo'", timeout=120)
        time.sleep(5)  # inside serve.run's wait for the app
        assert up.process.poll() is None, up.text()
        up.process.send_signal(signal.SIGINT)
        up.read_until("interrupted before the app was up", timeout=30)
        up.process.send_signal(signal.SIGINT)  # again, while Ray stops (as `timeout -s INT` signals twice)
        assert up.process.wait(timeout=60) == 130
        assert "neo-serve: deploying 'neo-serve'" in up.text()
        assert "Traceback" not in up.text() and "KeyboardInterrupt" not in up.text(), up.text()
        # Its Ray went down with it (raylet, GCS, Serve's controller: all in up's session).
        deadline = time.monotonic() + 15
        while left := session_processes(up.process.pid):
            assert time.monotonic() < deadline, left
            time.sleep(0.5)


def test_a_signal_to_the_whole_process_group_stops_up_at_once():
    """`timeout`, `kill -TERM -<pgid>` and systemd stopping a service signal Ray's processes
    along with `neo-serve up`: its raylet went with them, and the drain's Serve calls waited on it
    for ever ("Failed to push error to driver" every second) until SIGKILL, which left HAProxy's
    private files behind."""
    with neo_serve_up("--no-playground", "--port", str(free_port()), env=user_environ()) as up:
        up.read_until("Ctrl-C to stop", timeout=180)
        private = _haproxy_private_dir(up.process.pid)
        os.killpg(up.process.pid, signal.SIGTERM)
        assert up.process.wait(timeout=60) == 0, up.text()
        said = up.read_to_end(timeout=10).split("neo-serve: shutting down")[1]
        assert "stopped as well (the signal went to the whole process group)" in said, said
        assert "neo-serve: stopped" in said and "Traceback" not in said, said
        deadline = time.monotonic() + 15
        # Its Ray, and HAProxy (which Ray starts outside the process group), went with it.
        while left := session_processes(up.process.pid) + _haproxy_running_from(private):
            assert time.monotonic() < deadline, left
            time.sleep(0.5)
        assert not os.path.exists(private)


def _haproxy_private_dir(up_pid: int) -> str:
    """The directory of the one HAProxy the `neo-serve up` of process `up_pid` runs (its config,
    admin socket)."""
    dirs = {where for where in _haproxy_dirs().values() if _owner(where) == up_pid}
    assert len(dirs) == 1, (up_pid, _haproxy_dirs())
    return dirs.pop()


def test_a_port_in_use_is_one_line_before_any_ray():
    """A second `neo-serve up` (or any server on the port): Serve failed to bind it 10 s later,
    after a whole Ray had started, with HAProxy's remote traceback and no word of --port."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "up", "--port", str(port)], capture_output=True,
                             text=True, timeout=120, env=user_environ())
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.strip() == (f"neo-serve up: 127.0.0.1:{port} is already in use (another `neo-serve up`, or "
                                  "another server): stop it, or serve on another port with --port")
    assert "Ray" not in ran.stdout + ran.stderr  # refused before Ray started
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "up", "--port", "99999"], capture_output=True,
                         text=True, timeout=120, env=user_environ())
    assert ran.returncode == 2 and "argument --port: 99999 is not a port number (1-65535)" in ran.stderr


def test_the_haproxy_of_a_killed_up_does_not_keep_its_port_from_the_next_one():
    """`neo-serve up` killed outright (SIGKILL, the OOM killer) left its HAProxy listening on the
    port: the same command again said the port was in use, by nothing the user had started."""
    import shutil
    import socket

    directory = abandoned_haproxy_dir()
    port = free_port()
    left_running = start_haproxy(os.path.join(directory, "node"), port)
    try:
        with socket.socket() as metrics:  # a busy --metrics-port: refused right after the HTTP port's check
            metrics.bind(("0.0.0.0", 0))
            metrics.listen()
            ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "up", "--port", str(port), "--metrics-port",
                                  str(metrics.getsockname()[1])], capture_output=True, text=True, timeout=120,
                                 env=user_environ())
        assert ran.returncode == 2 and "--metrics-port" in ran.stderr, ran.stdout + ran.stderr
        assert left_running.wait(timeout=10) is not None and not os.path.exists(directory)
    finally:
        left_running.kill()
        left_running.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_port_taken_after_the_check_is_one_line_too():
    """Two `neo-serve up` started at once both pass the check; the second's HAProxy then fails to
    bind (its text as Ray 2.60 raises it, from the QA run that found it): the same one line."""
    haproxy = RuntimeError("ray::HAProxyManager.ready() (pid=4242, ip=127.0.0.1)\nRuntimeError: HAProxy crashed during "
                           "startup: [NOTICE] ... [ALERT] (4250) : Binding [/tmp/neo-hap-x/haproxy.cfg:40] for "
                           "frontend http_frontend: cannot bind socket (Address already in use) for [127.0.0.1:18462]")
    assert failure_message(haproxy, "127.0.0.1", 18462) == (
        "127.0.0.1:18462 is already in use (another `neo-serve up`, or another server): stop it, or serve on "
        "another port with --port")
    # Another port's bind failure (one the port is a prefix of too), or any other failure, is told as it is.
    assert failure_message(haproxy, "127.0.0.1", 8000).startswith("RuntimeError: ray::HAProxyManager.ready()")
    assert failure_message(haproxy, "127.0.0.1", 1846).startswith("RuntimeError: ray::HAProxyManager.ready()")
    assert failure_message(ValueError("no GPU"), "127.0.0.1", 8000) == "ValueError: no GPU"


def test_a_bad_host_metrics_port_or_app_name_is_one_line_before_any_ray():
    """Each started a whole Ray first: an unknown host failed Serve's bind naming the wrong port,
    a metrics port in use timed Ray's start out 30 s later blaming an overloaded GCS, and an empty
    application name got Serve's own refusal."""
    import socket

    def up(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "neo_serve.cli", "up", "--port", str(free_port()), *args],
                              capture_output=True, text=True, timeout=120, env=user_environ())

    ran = up("--host", "bogus.invalid")
    assert ran.returncode == 2 and ran.stderr.startswith("neo-serve up: --host bogus.invalid: cannot be resolved")
    assert "Ray" not in ran.stdout + ran.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        metrics_port = held.getsockname()[1]
        ran = up("--metrics-port", str(metrics_port))
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.strip() == (f"neo-serve up: --metrics-port {metrics_port} is already in use: choose another, "
                                  "or leave it out for a free one")
    ran = up("--app-name", " ")
    assert ran.returncode == 2 and "argument --app-name: give the application a name" in ran.stderr
