import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_configure(config):
    """Launches fork from the launch server (tests/launch_server.py) unless DS_FINETUNE_TEST_FORK=0."""
    harness.USE_LAUNCH_SERVER = os.environ.get("DS_FINETUNE_TEST_FORK", "1") != "0"


def pytest_unconfigure(config):
    harness.stop_launch_servers()


def pytest_collection_finish(session):
    """Start the jobs of selected tests marked harness.started_early: they mostly sleep, so they overlap
    the rest of the suite instead of adding their wait to it. Under pytest-xdist every worker collects every
    test; the first worker starts the jobs in a folder all workers know, and the test may run on either."""
    run_id, worker = os.environ.get("PYTEST_XDIST_TESTRUNUID"), os.environ.get("PYTEST_XDIST_WORKER")
    if run_id:
        harness.EARLY_ROOT = Path(tempfile.gettempdir()) / f"ds-finetune-early-{run_id}"
    if worker not in (None, "gw0"):
        return
    for item in session.items:
        starter = getattr(getattr(item, "function", None), "started_early", None)
        if starter is not None:
            if harness.EARLY_ROOT is None:
                folder = Path(tempfile.mkdtemp(prefix="ds-finetune-early-"))
            else:
                folder = harness.early_folder(harness.EARLY_ROOT, item.nodeid)
                folder.mkdir(parents=True)
            harness.EARLY[item.nodeid] = starter(folder)
            STARTED.append(harness.EARLY[item.nodeid])


STARTED: list = []  # the early jobs this process started, whichever worker runs their tests


DURATIONS = Path(__file__).parent / "durations.json"  # seconds a test took in a full run (setup included)


def pytest_collection_modifyitems(items):
    """The order that keeps every xdist worker busy to the end. `--dist worksteal` gives N workers N
    consecutive shares of the list; a worker whose queue runs dry steals the end of another's. So each
    share starts with the same part of the tests that launch DeepSpeed, longest first (a long test started
    last leaves the others idle), and ends with in-process tests, which fill the tail; those keep their
    order, so a module's shared fixtures (a process group) are set up once a worker. The durations come
    from a run of the whole suite (durations.json: refresh it when tests change much); a launched test it
    does not know counts 10 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    known = json.loads(DURATIONS.read_text())
    launched = sorted((item for item in items if item.get_closest_marker("multiproc")),
                      key=lambda item: known.get(item.nodeid, 10.0), reverse=True)
    in_process = [item for item in items if not item.get_closest_marker("multiproc")]
    shares, totals = [[] for _ in range(workers)], [0.0] * workers
    for item in launched:
        w = totals.index(min(totals))
        shares[w].append(item)
        totals[w] += known.get(item.nodeid, 10.0)
    ordered, left = [], len(items)
    for w, share in enumerate(shares):  # xdist sends each worker in turn the pending tests // workers left
        size = left // (workers - w)
        fill = max(0, size - len(share))
        ordered += share + in_process[:fill]
        in_process, left = in_process[fill:], left - len(share) - fill
    items[:] = ordered + in_process


def pytest_sessionfinish(session):
    """A job whose test ran on another worker may still be running: wait for it (that test removes its
    folder). A session stopped early (-x, Ctrl-C) kills what it started instead."""
    stopped = bool(session.shouldstop or session.shouldfail)
    for job in STARTED:
        if stopped or not harness.wait_for(lambda: job.proc.poll() is not None, timeout=600, interval=0.5):
            harness.kill_job(job.proc)
    not_run_here = [job.folder for job in harness.EARLY.values()]
    harness.EARLY.clear()
    if harness.EARLY_ROOT is None or stopped:  # no other worker will read them
        for folder in not_run_here:
            shutil.rmtree(folder, ignore_errors=True)
    if harness.EARLY_ROOT is not None and os.environ.get("PYTEST_XDIST_WORKER") == "gw0":
        with contextlib.suppress(OSError):  # left to the last test to read it when not yet empty
            harness.EARLY_ROOT.rmdir()


def shared_root(tmp_path_factory) -> Path:
    """One folder for the whole session: the run's base temp, or under xdist the folder above every
    worker's own, so that the workers share what `made_once` builds."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once for the session in `<shared root>/<name>`, whichever worker asks first; the
    others wait on a file lock. A failed make leaves no `done` mark, so the next asker tries again."""
    root = shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """stage -> output dir of an uninterrupted 2-rank run of harness.BASE at that ZeRO stage (run once)."""
    def get(stage: int, nproc: int = 2, extra=()) -> Path:
        key = hashlib.sha256(json.dumps(list(extra)).encode()).hexdigest()[:12]
        return made_once(tmp_path_factory, f"ref-stage{stage}-np{nproc}-{key}",
                         lambda out: harness.train(out, [f"train.zero_stage={stage}", *extra], nproc=nproc))
    return get


@pytest.fixture(scope="session")
def saved_at_step4(tmp_path_factory):
    """stage -> a 2-rank run dir killed during step 5 whose newest checkpoint is step 4 (harness.BASE)."""
    def kill_during_step5(out: Path, stage: int) -> None:
        proc = harness.train(out, [f"train.zero_stage={stage}"], fault="mid_accum:rank0@step5", expect_ok=False)
        assert proc.returncode == -9, proc.stdout[-2000:]
    return lambda stage: made_once(tmp_path_factory, f"saved-stage{stage}", lambda out: kill_during_step5(out, stage))


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, for in-process code that calls a collective (torn down afterwards)."""
    with process_group(tmp_path / "store"):
        yield


@contextlib.contextmanager
def process_group(store: Path):
    """A one-process gloo group (none made where one exists), torn down afterwards (`destroy_group`)."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_group()


def destroy_group() -> None:
    """Tear the default process group down, through DeepSpeed where it has seen it: deepspeed.comm then
    drops the groups it derived from it (its clone of the world group), which the next in-process engine
    of this worker would otherwise be handed, destroyed ("Group ... is not registered")."""
    import torch.distributed as dist
    from deepspeed import comm

    if comm.is_initialized():
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()
