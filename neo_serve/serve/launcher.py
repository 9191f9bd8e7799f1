"""`neo-serve up`: local Ray + Serve with the neo-serve application, until Ctrl-C.

    neo-serve up                                  # the bundled demo model, one stage
    neo-serve up /models/pythia-160m --stages 2 --autoscale 1:4
    neo-serve up /models/a /models/b --replicas 2 --port 8080

The CLI wires these in with `add_up_arguments(subparser)` and `run_up(namespace)`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from neo_serve.serve.access import load_api_keys
from neo_serve.serve.config import DEFAULT_APP_NAME, AppArgs, AppConfigError, RouterArgs, parse_app_args
from neo_serve.serve.ingress import INGRESS_CHOICES, IngressUnavailable, remove_abandoned_haproxy
from neo_serve.serve.local_cluster import (RayProcessesStopped, configure_local_cluster, run_while_ray_runs,
                                           shut_down_serve)
from neo_serve.serve.machine import available_cores

ALL_INTERFACES = ("0.0.0.0", "::")  # --host values that bind every interface (IPv4, IPv6)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535 (Ray would start before Serve refused it)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def app_name(text: str) -> str:
    """An argparse type: Serve's application name, which may not be empty (Serve refused it only
    after Ray had started)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give the application a name (Serve refuses an empty one)")
    return text


def host_problem(host: str, port: int) -> str | None:
    """What keeps Serve from listening on host:port, told before Ray starts (Serve's own failure
    comes 10 s later as a remote traceback): a name that does not resolve, a port in use."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return (f"--host {host}: cannot be resolved ({exc.strerror}); give an address (127.0.0.1, 0.0.0.0) "
                "or a known name")
    return address_in_use(host, port) if port_in_use(host, port) else None


def drain_application(app_name: str, stop: threading.Event) -> None:
    """Delete the application as Serve deletes one, and wait: no new request reaches it, and
    each replica stops once its requests in flight are done (up to its
    graceful_shutdown_timeout_s), so their streams end whole, not cut by the shutdown. Another
    signal (`stop` set again) ends the wait, and the shutdown cuts what still runs; so does the
    end of any of our own Ray's processes (the signal reached the whole process group)."""
    from ray import serve

    def delete_and_wait() -> None:
        serve.delete(app_name, _blocking=False)
        while app_name in serve.status().applications:
            time.sleep(0.5)

    print("neo-serve: shutting down; requests in flight finish first (Ctrl-C again to stop now)", flush=True)
    stop.clear()
    try:
        if not run_while_ray_runs(delete_and_wait, stop=stop):
            print("neo-serve: stopping now; requests still in flight are cut", flush=True)
    except RayProcessesStopped as gone:
        print(f"neo-serve: Ray's {gone} stopped as well (the signal went to the whole process group); requests "
              "still in flight are cut", flush=True)


def failure_message(exc: BaseException, host: str, port: int) -> str:
    """What `neo-serve up` prints when starting Serve or the app failed. The port can be taken
    between the check before Ray and Serve's bind (two `neo-serve up` started at once): one line
    then, not HAProxy's remote traceback."""
    text = str(exc)
    if "Address already in use" in text and re.search(rf":{port}(?!\d)", text):
        return address_in_use(host, port)
    return f"{type(exc).__name__}: {text}"


def address_in_use(host: str, port: int) -> str:
    return (f"{host}:{port} is already in use (another `neo-serve up`, or another server): stop it, or serve "
            "on another port with --port")


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port, so that Serve could not bind it. Checked
    before Ray starts: Serve's own failure comes 10 s later as a remote traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As servers do: a previous run's connections in TIME_WAIT do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:  # in use; else (no IPv6, a name that does not resolve) Serve says what
        return exc.errno == errno.EADDRINUSE
    return False


def _metrics_export_port() -> int | None:
    """The Prometheus port of the local Ray this process started (None if Ray does not say)."""
    try:
        import ray._private.worker as ray_worker

        return int(ray_worker.global_worker.node.metrics_export_port) or None
    except Exception:  # noqa: BLE001 - a private attribute: without it the banner only lacks a line
        return None


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `neo-serve up`'s options to `parser`."""
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                        help="checkpoint directories to serve (default: the bundled demo model); each is "
                             "served under its directory name")
    parser.add_argument("--name", action="append", metavar="NAME",
                        help="served model name, once per checkpoint in order (default: the directory name)")
    parser.add_argument("--stages", type=int, default=1, metavar="N", help="pipeline stages per replica (default 1)")
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, metavar="R", help="fixed pipeline replicas per model (default 1)")
    scaling.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale each model between MIN and MAX replicas")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype (default auto: the checkpoint's; on a CPU, float16 runs in float32)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per stage")
    parser.add_argument("--cpus-per-stage", type=float, metavar="C",
                        help="CPUs per stage, which are also its torch threads. Default on a local CPU cluster: "
                             "torch's threads (the physical cores; one left to the router and Ray above two) over "
                             "every stage of every replica; else 1. On a CPU a small model may serve more under "
                             "load with --replicas R of 1 CPU each than with one replica of R CPUs")
    parser.add_argument("--kv-cache-tokens", type=int, metavar="T", help="KV cache slots per stage")
    parser.add_argument("--max-num-seqs", type=int, metavar="S", help="most sequences running per pipeline")
    parser.add_argument("--max-model-len", type=int, metavar="L", help="context window (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--metrics-port", type=port_number, default=None,
                        help="port of a local Ray's Prometheus endpoint, /metrics (default: a free one; "
                             "the banner prints it)")
    parser.add_argument("--app-name", type=app_name, default=DEFAULT_APP_NAME,
                        help=f"Serve application name (default {DEFAULT_APP_NAME})")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray (default: the cores, or what the app reserves if more)")
    parser.add_argument("--ingress", choices=INGRESS_CHOICES, default="auto",
                        help="front door of a local cluster: haproxy (Ray Serve's HAProxy ingress, the least CPU "
                             "per request), proxy (Serve's Python proxy) or auto (haproxy when its binary is "
                             "installed, as with ray[serve] on Linux)")
    parser.add_argument("--no-playground", dest="playground", action="store_false",
                        help="do not serve the Gradio playground at /ui")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray Serve's own start-up and scaling messages (controller, proxy; "
                             "default: only their warnings). Request logs and the models' logs always show")


def app_args_from_namespace(args: argparse.Namespace, cpu_threads: int | None = None) -> dict[str, Any]:
    """The `build_app` args that `neo-serve up` options describe. `cpu_threads`: the threads a
    local CPU cluster has for its models (`local_cpu_threads`), split over their stages unless
    `--cpus-per-stage` or `--gpu` is given; None keeps the app's default of one CPU per stage."""
    names = args.name or []
    checkpoints = args.checkpoints or [None]
    if names and len(names) != len(checkpoints):
        raise AppConfigError(f"--name given {len(names)} times for {len(checkpoints)} checkpoint(s)")
    model: dict[str, Any] = {"num_stages": args.stages, "dtype": args.dtype, "use_gpu": args.gpu}
    for option in ("cpus_per_stage", "kv_cache_tokens", "max_num_seqs", "max_model_len"):
        if getattr(args, option) is not None:
            model[option] = getattr(args, option)
    most_replicas = args.replicas or 1
    if args.autoscale:
        try:
            low, high = (int(part) for part in args.autoscale.split(":"))
        except ValueError:
            raise AppConfigError(f"--autoscale must be MIN:MAX, got {args.autoscale!r}") from None
        model["autoscaling"] = {"min_replicas": low, "max_replicas": high}
        most_replicas = high
    elif args.replicas is not None:
        model["num_replicas"] = args.replicas
    if cpu_threads is not None and args.cpus_per_stage is None and not args.gpu:
        pipelines = len(checkpoints) * max(1, most_replicas)
        model["cpus_per_stage"] = threads_per_stage(cpu_threads, args.stages, pipelines)
    models = []
    for index, checkpoint in enumerate(checkpoints):
        entry = dict(model)
        if checkpoint is not None:
            # Relative to where `neo-serve up` runs, not to each Ray worker's directory (the same
            # on a local cluster, not on one joined with --address); /v1/models shows it so.
            entry["checkpoint"] = os.path.abspath(os.path.expanduser(checkpoint))
        if names:
            entry["name"] = names[index]
        models.append(entry)
    app_args: dict[str, Any] = {"models": models}
    if not getattr(args, "playground", True):
        app_args["playground"] = {"enabled": False}
    return app_args


def local_cpu_threads(cores: int, torch_threads: int | None = None) -> int:
    """Threads the models of a local CPU cluster share: torch's own default (the physical cores,
    or OMP_NUM_THREADS), at most the cores this process may use, less one core for the router,
    the HTTP front door and Ray when there are more than two. Under 64 streams those took about
    half a core on 2 vCPUs, and a preempted OpenMP thread holds up all of its step's threads (as
    vLLM's CPU backend reserves a core for its API server). On 2 cores the model keeps both: one
    replica on 2 threads served as much as on 1 under load and 1.5x more to a single stream of
    Pythia-160M (docs/serving.md)."""
    if torch_threads is None:
        import torch

        torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, cores))
    return threads - 1 if threads > 2 else threads


def threads_per_stage(threads: int, stages: int, pipelines: int) -> int:
    """`threads` split evenly over `pipelines` x `stages` stages, at least one each (bad counts
    are left for the app's validation to name)."""
    return max(1, threads // max(1, stages * pipelines))


def local_num_cpus(app_args: AppArgs, requested: int | None, cores: int) -> int | None:
    """Logical CPUs of a local Ray: `--num-cpus` if given; else Ray's own count of the cores (None),
    unless the app reserves more, e.g. `--replicas 2` of 1 CPU each plus the router's CPU on 2
    cores: then what it reserves, so every replica is placed. Logical CPUs only schedule; each
    stage runs its own `cpus_per_stage` threads whatever Ray counts."""
    if requested is not None:
        return requested
    reserved = math.ceil(app_args.cpus_reserved())
    return reserved if reserved > cores else None


def api_keys_line(router: RouterArgs) -> str | None:
    """The banner's line when the router will want API keys (it reads the same variable, which
    its local Ray inherits): without it the printed URLs answer 401 with no word of why."""
    if not load_api_keys(router.api_keys_env, router.api_keys_file):
        return None
    where = router.api_keys_env or "router.api_keys_file"
    return f"  api keys     on ({where}): send Authorization: Bearer <key>; the playground asks for one"


def gpu_shortfall(app_args: AppArgs, cluster_gpus: float) -> str | None:
    """Why a local cluster with `cluster_gpus` GPUs cannot place the pipelines the app starts
    with (every model's, `--replicas` or the low end of `--autoscale` each), or None. Serve would
    wait for the GPUs for ever (a local cluster gains none), printing nothing."""
    needs = []
    for model in app_args.models:
        per_pipeline = sum(bundle.get("GPU", 0) for bundle in model.placement_bundles())
        starting = model.starting_replicas()
        if per_pipeline and starting:
            needs.append((model, per_pipeline, starting))
    needed = sum(per_pipeline * starting for _, per_pipeline, starting in needs)
    if needed <= cluster_gpus:
        return None
    seen = f"Ray sees {cluster_gpus:g} on this machine" if cluster_gpus else "Ray sees no GPU on this machine"
    parts = ", ".join(f"{model.served_name}: {starting} pipeline(s) x {per_pipeline:g} (--stages {model.num_stages})"
                      for model, per_pipeline, starting in needs)
    return (f"the app starts with pipelines needing {needed:g} GPU(s) ({parts}; --gpu puts each stage on one) and "
            f"{seen} (CUDA_VISIBLE_DEVICES, the NVIDIA driver): fewer --stages or --replicas, or leave out --gpu "
            "to serve on the CPU")


def run_up(args: argparse.Namespace) -> int:
    """Start Ray and Serve, deploy the app, print its URLs and block until Ctrl-C / SIGTERM.
    Returns the process exit code."""
    address = args.address or os.environ.get("RAY_ADDRESS")
    # First what a mistyped flag gets wrong (a second or less), then the app's arguments (torch's
    # thread count), then the app's modules (Ray, torch and the model code: seconds).
    if address:
        ingress = "the cluster's own"
        if args.ingress != "auto":
            print(f"neo-serve up: --ingress {args.ingress} ignored: a joined cluster keeps the ingress it was "
                  "started with (RAY_SERVE_ENABLE_HA_PROXY in its environment)", file=sys.stderr)
        if args.num_cpus is not None:
            print(f"neo-serve up: --num-cpus {args.num_cpus} ignored: a joined cluster's nodes declare their own "
                  "CPUs (ray start --num-cpus)", file=sys.stderr)
        if args.metrics_port is not None:
            print(f"neo-serve up: --metrics-port {args.metrics_port} ignored: a joined cluster's nodes export "
                  "metrics where they were started to (ray start --metrics-export-port)", file=sys.stderr)
    else:
        # A `neo-serve up` killed outright (SIGKILL, the OOM killer) left its HAProxy holding its
        # port: stopped first, so that the same command works again.
        remove_abandoned_haproxy()
        if problem := host_problem(args.host, args.port):
            print(f"neo-serve up: {problem}", file=sys.stderr)
            return 2
        # Ray binds its Prometheus port on every interface; taken, its start timed out 30 s later
        # blaming an overloaded GCS, with the cause in a log file only.
        if args.metrics_port is not None and port_in_use("0.0.0.0", args.metrics_port):
            print(f"neo-serve up: --metrics-port {args.metrics_port} is already in use: choose another, or leave "
                  "it out for a free one", file=sys.stderr)
            return 2
        try:
            ingress = configure_local_cluster(args.ingress)  # before Ray starts: its processes inherit it
        except IngressUnavailable as exc:
            print(f"neo-serve up: {exc}", file=sys.stderr)
            return 2

    cores = available_cores()
    # A joined cluster's nodes are not this machine: there a stage keeps the app's 1 CPU.
    cpu_threads = None if address else local_cpu_threads(cores)
    from neo_serve.app import build_app

    try:
        app_args = parse_app_args(app_args_from_namespace(args, cpu_threads))
        app = build_app(app_args)
    except AppConfigError as exc:
        print(f"neo-serve up: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    num_cpus = None if address else local_num_cpus(app_args, args.num_cpus, cores)
    up, stop = threading.Event(), threading.Event()
    deleting = False

    def on_signal(*_: Any) -> None:
        if not up.is_set():
            # Still starting: Serve waits for an app it cannot place (too few CPUs) for ever, in a
            # polling loop only an exception leaves. Further signals (`timeout -s INT` sends two)
            # would only interrupt the shutdown below with a traceback.
            ignore_signals()
            raise KeyboardInterrupt
        stop.set()

    def ignore_signals() -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore_signals() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # "local": a cluster of our own, even if one started by `ray start` runs on this machine
        # (plain ray.init() would join that one, and the shutdown below would stop its apps).
        metrics_port = {} if address or args.metrics_port is None else {"_metrics_export_port": args.metrics_port}
        ray.init(address=address or "local", num_cpus=num_cpus, include_dashboard=False, **metrics_port)
        # ray.init installs its own SIGTERM handler (sys.exit(15) at once): ours again, so that
        # SIGTERM (`docker stop`, a Pod's end) shuts down as Ctrl-C does.
        for sig in previous:
            signal.signal(sig, on_signal)
        if not address and (problem := gpu_shortfall(app_args, ray.cluster_resources().get("GPU", 0))):
            print(f"neo-serve up: {problem}", file=sys.stderr)
            return 2
        # Serve's controller, proxy and HAProxy manager log each step of a start at INFO (40 lines
        # before the banner); keep their warnings and errors. The replicas' logs are the app's.
        system_log_level = "INFO" if args.verbose else "WARNING"
        logging.getLogger("ray.serve").setLevel(system_log_level)  # this process's ("Connecting to...")
        serve.start(http_options={"host": args.host, "port": args.port},
                    logging_config={"log_level": system_log_level})
        print(f"neo-serve: deploying {args.app_name!r} (Ctrl-C to give up)", flush=True)
        serve.run(app, name=args.app_name, route_prefix="/")
        up.set()
        host = "127.0.0.1" if args.host in ALL_INTERFACES else args.host
        base = f"http://[{host}]:{args.port}" if ":" in host else f"http://{host}:{args.port}"
        print(f"neo-serve is up: application {args.app_name!r}", flush=True)
        print(f"  OpenAI API   {base}/v1  (POST /v1/completions, GET /v1/models)", flush=True)
        print(f"  health       {base}/health", flush=True)
        print(f"  API docs     {base}/docs", flush=True)
        if not address and (keys_line := api_keys_line(app_args.router)):
            print(keys_line, flush=True)
        # Where other processes' `ray.init` find this cluster, for Serve handles: "auto" takes the
        # first Ray on the machine, which with two `neo-serve up` may be the other's.
        gcs_address = ray.get_runtime_context().gcs_address
        print(f"  ray address  {gcs_address}  (handles from another process: RAY_ADDRESS={gcs_address})", flush=True)
        print(f"  ingress      {ingress}", flush=True)
        if ingress == "haproxy" and not address and args.host not in ALL_INTERFACES:
            # Serve's controller warns, above, whenever HAProxy's host is not every interface: only
            # HAProxy on another node would need that, and this cluster is this machine alone.
            print(f"  note         Serve's warning about HTTPOptions.host={args.host!r} is for clusters of "
                  "several nodes; this one has one", flush=True)
        if not address and (exported := _metrics_export_port()):
            print(f"  metrics      http://127.0.0.1:{exported}/metrics  (Prometheus: ray_neo_serve_*, "
                  "ray_serve_*)", flush=True)
        per_stage = sorted({t for m in app_args.models if (t := m.stage_threads()) is not None})
        if per_stage:  # CPU stages: the torch threads each one sets (GPU stages keep torch's default)
            print(f"  threads      {', '.join(map(str, per_stage))} per stage (torch threads; --cpus-per-stage)",
                  flush=True)
        if num_cpus is not None and args.num_cpus is None:
            print(f"  ray cpus     {num_cpus} logical on {cores} cores, so that every deployment is placed "
                  "(they add no threads)", flush=True)
        if getattr(args, "playground", True):
            print(f"  playground   {base}/ui/", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        deleting = True  # on a joined cluster Serve goes on deleting it after a second Ctrl-C
        drain_application(args.app_name, stop)
        return 0
    except KeyboardInterrupt:
        if up.is_set():
            return 0
        print("neo-serve: interrupted before the app was up; shutting down", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # deployment failures: say what failed, exit non-zero
        print(f"neo-serve up: {failure_message(exc, args.host, args.port)}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            try:
                if address and not deleting:  # someone else's cluster: remove only our application
                    restore_signals()  # Ctrl-C may cut Serve's wait for its replicas short
                    serve.delete(args.app_name)
                elif not address and up.is_set():
                    restore_signals()
                    run_while_ray_runs(shut_down_serve)
                # Else interrupted while deploying: Serve's controller would wait 30 s for replicas
                # it never placed; our own Ray goes down whole below, Serve with it.
            except RayProcessesStopped:
                pass  # the signal reached them too: what is left of Ray goes down below
            except KeyboardInterrupt:
                print("neo-serve: stopping at once" if not address else
                      f"neo-serve: left {args.app_name!r} to Serve to delete", file=sys.stderr, flush=True)
            finally:
                ignore_signals()  # a few seconds; another Ctrl-C would only print a traceback
                ray.shutdown()
            if up.is_set():
                print("neo-serve: stopped", flush=True)
        restore_signals()
