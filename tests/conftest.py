import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_collection_finish(session):
    """Start the jobs of selected tests marked harness.started_early: they mostly sleep, so they overlap
    the rest of the suite instead of adding their wait to it."""
    for item in session.items:
        starter = getattr(getattr(item, "function", None), "started_early", None)
        if starter is not None:
            folder = Path(tempfile.mkdtemp(prefix="ds-finetune-early-"))
            EARLY_FOLDERS.append(folder)
            harness.EARLY[item.nodeid] = starter(folder)


EARLY_FOLDERS: list[Path] = []


def pytest_sessionfinish(session):
    for job in harness.EARLY.values():  # a test that never ran (-x stopped the session)
        harness.kill_job(job.proc)
    harness.EARLY.clear()
    for folder in EARLY_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """stage -> output dir of an uninterrupted 2-rank run of harness.BASE at that ZeRO stage (run once)."""
    done = {}

    def get(stage: int, nproc: int = 2, extra=()) -> Path:
        key = (stage, nproc, tuple(extra))
        if key not in done:
            out = tmp_path_factory.mktemp(f"ref-stage{stage}-np{nproc}")
            harness.train(out, [f"train.zero_stage={stage}", *extra], nproc=nproc)
            done[key] = out
        return done[key]
    return get


@pytest.fixture(scope="session")
def saved_at_step4(tmp_path_factory):
    """stage -> a 2-rank run dir killed during step 5 whose newest checkpoint is step 4 (harness.BASE)."""
    done = {}

    def get(stage: int) -> Path:
        if stage not in done:
            out = tmp_path_factory.mktemp(f"saved-stage{stage}")
            proc = harness.train(out, [f"train.zero_stage={stage}"], fault="mid_accum:rank0@step5", expect_ok=False)
            assert proc.returncode == -9, proc.stdout[-2000:]
            done[stage] = out
        return done[stage]
    return get


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, for in-process code that calls a collective (torn down afterwards)."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
