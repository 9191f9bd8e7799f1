"""Shared fixtures: tiny random checkpoints made once per test session with transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The tests stay offline. gradio_client's `Client(analytics_enabled=False)` still starts its
# telemetry thread (it ORs the argument with this variable), which posts to huggingface.co.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from checkpoints import build_tokenizer, make_neo, make_neox  # noqa: E402
from conftest_serve import SHARED_CLUSTER_MODULES, SharedCluster, shared_cluster  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_neox(tmp_path_factory.mktemp("neox"), tokenizer)


@pytest.fixture(scope="session")
def neox_sequential_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """Sequential residual, exact gelu replaced by relu, rotary on half the head."""
    return make_neox(tmp_path_factory.mktemp("neox-seq"), tokenizer, seed=1, use_parallel_residual=False,
                     hidden_act="relu", rotary_pct=0.5)


@pytest.fixture(scope="session")
def neox_sharded_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_neox(tmp_path_factory.mktemp("neox-sharded"), tokenizer, seed=2, shard=True)


@pytest.fixture(scope="session")
def neox_hub_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """GPT-NeoX-20B's published style: rotary_pct/rotary_emb_base, legacy buffers, gelu_fast."""
    return make_neox(tmp_path_factory.mktemp("neox-hub"), tokenizer, seed=3, hub_style=True)


@pytest.fixture(scope="session")
def neo_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """GPT-Neo with vocab.json + merges.txt only, global/local layers, window 16."""
    return make_neo(tmp_path_factory.mktemp("neo"), tokenizer)


@pytest.fixture(scope="session")
def shared_serve() -> SharedCluster:
    """One local Ray cluster with Serve for the modules in SHARED_CLUSTER_MODULES (see there)."""
    with shared_cluster() as cluster:
        yield cluster


SHARED_CLUSTER_GROUP, OTHER_GROUP = "shared-cluster", "the-rest"  # pytest-xdist groups, one worker each


# Before pytest-xdist's own hook, which reads the groups this one gives.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules sharing a cluster run last, one after another: it stays up from the first of
    them to the session's end, and no other module may start a Ray of its own in this process
    meanwhile.

    Under `pytest -n 2 --dist loadgroup` they are one group, run by one worker process, and every
    other test is the other group, run by the other worker at the same time: the suite's Ray tests
    leave a third of two cores idle (Serve's control loop, start-ups, shutdowns), and the two
    groups take about as long (17-18 min against 20-25 on 2 cores, with OMP_WAIT_POLICY=PASSIVE;
    scripts/test.sh does not, see there). Each worker starts its own Ray clusters; nothing in a
    test may assume it is the only one on the machine."""
    def shares_the_cluster(item: pytest.Item) -> bool:
        return item.module is not None and item.module.__name__.rpartition(".")[2] in SHARED_CLUSTER_MODULES

    items.sort(key=shares_the_cluster)  # stable: the order within each part is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SHARED_CLUSTER_GROUP if shares_the_cluster(item) else OTHER_GROUP))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the repository")
    return path

# ---- no silent skips ------------------------------------------------------------------------
# A skipped test passes CI unchecked; a missing tool (Chromium, ../shared) must fail the run and
# say what to install. Any skip, from a marker or a call, is reported as a failure, and so is an
# expected failure (xfail, which passes whether or not the feature works).
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"the suite has no expected failures; this test is marked xfail: {report.wasxfail}"
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"the suite does not skip tests; this one was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    # A module that skips itself (pytest.skip(allow_module_level=True), importorskip) skips at
    # collection: that fails the run too.
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"the suite does not skip tests; {collector.nodeid} was skipped: {report.longrepr}"


# ---- ending the test process ----------------------------------------------------------------
# The suite starts and stops several local Ray clusters in this one process. Ray Serve leaves
# threads behind in a driver that used handles (its router's event loop, a daemon thread kept for
# the process's life), and CI once saw the interpreter segfault while tearing itself down after
# pytest had reported "373 passed" (Ray's own tracker has such crashes after ray.shutdown in a
# process that keeps threads using Ray, e.g. ray-project/ray#31145). Nothing of the product runs
# then, so once pytest has reported, the process ends with pytest's own exit status and skips the
# interpreter's teardown. A crash during the tests still fails the run, and `scripts/test.sh`
# runs Python with -X faulthandler so that one prints every thread's stack.
_session_exit_status: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _session_exit_status
    _session_exit_status = int(exitstatus)


def _process_is_pytest() -> bool:
    """True when this process is `pytest` or `python -m pytest`, not a program calling pytest.main()."""
    program = Path(sys.argv[0])
    return program.name in ("pytest", "py.test") or (program.name == "__main__.py" and program.parent.name == "pytest")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # A pytest-xdist worker has sent its results ("workerfinished") by now; the main process then
    # takes its end as expected, whatever the exit.
    is_xdist_worker = hasattr(config, "workerinput")
    if _session_exit_status is None or not (_process_is_pytest() or is_xdist_worker):
        return
    # os._exit skips Ray's own atexit shutdown: a session a test left up (outside the module
    # fixtures, which always tear down) would otherwise leave its GCS and raylet running.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    ingress = sys.modules.get("neo_serve.serve.ingress")
    if ingress is not None:  # its atexit hook would remove it
        ingress.remove_haproxy_private_dir()
    who = f" (pytest-xdist worker {config.workerinput['workerid']})" if is_xdist_worker else ""
    print(f"conftest{who}: tests reported; ending the process with exit status {_session_exit_status} "
          "without the interpreter's teardown", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_session_exit_status)
