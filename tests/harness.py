"""What the tests share. Launching real training processes, for the multi-process tests and for `make bench`
(bench/common.py imports this module): ports, environment, argv, killing a whole job, reading metrics,
comparing runs. And the in-process tests' common pieces: the one-line-error assertion, the tiny model,
JSONL files, a checkpoint consolidated whole, a step's slice of the order. Nothing here imports torch at
module level (a launching test would pay for it).

Bulk runs use tests/scripts/launch_ranks.py, which starts the ranks with torchrun's variables without
importing torch (≈3.5 s cheaper a start than torchrun, ≈7.5 s than the `deepspeed` launcher, which the
signal and CLI tests use; the bench uses torchrun); all run the same `launch/train.py`. Every run starts
in a new session, and each launch gets its own DS_FINETUNE_FAULT_ID, so an injected fault kills exactly
that job, never pytest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent
TINY = ROOT / "configs" / "tiny.yaml"

# The configuration every exactness/fault test shares, so reference runs can be shared too:
# dropout on (RNG restore matters), grad_accum 2, a checkpoint every step.
BASE = [
    "train.max_steps=10", "train.micro_batch_size=2", "train.grad_accum=2", "train.warmup_steps=2",
    "model.config.attention_dropout=0.1", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_ids=true",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None, cpu: bool = True) -> dict:
    env = dict(os.environ)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("DS_FINETUNE_CACHE", str(ROOT / "build" / "test-cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("DS_FINETUNE_FAULT", None)
    env["DS_FINETUNE_FAULT_ID"] = uuid.uuid4().hex  # this launch's processes, and no other job's
    env.update(extra or {})
    return env


def torchrun_argv(script: Path, args: list[str], nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", str(script), *args]


def ranks_argv(script: Path, args: list[str], nproc: int) -> list[str]:
    launcher = ROOT / "tests" / "scripts" / "launch_ranks.py"
    return [PY, str(launcher), str(nproc), str(free_port()), str(script), *args]


def train_argv(out_dir: Path, overrides=(), nproc: int = 2, resume: str | None = None, flags=()) -> list[str]:
    args = ["--config", str(TINY)]
    if resume is not None:
        args += ["--resume"] + ([] if resume == "auto" else [resume])
    args += [*flags, *BASE, *overrides, f"output_dir={out_dir}"]
    script = ROOT / "launch" / "train.py"
    return [PY, str(script), *args] if nproc == 1 else ranks_argv(script, args, nproc)


# The suite's launch server (tests/launch_server.py): launches forked from a process that has imported
# torch, DeepSpeed and transformers. The conftest turns it on; off, every launch is a new interpreter (the
# bench's are).
USE_LAUNCH_SERVER = False
_launch_servers: dict = {}  # launch_server.import_key -> its server


def forked(argv: list[str], env: dict, stdout: int, stderr: int, outputs: list[int]):
    """The launch forked by a launch server of its import environment (started at the first such launch),
    else None."""
    if not USE_LAUNCH_SERVER:
        return None
    from launch_server import MAX_SERVERS, LaunchServer, import_key
    server = _launch_servers.get(import_key(env))
    if server is None and len(_launch_servers) < MAX_SERVERS:
        server = _launch_servers[import_key(env)] = LaunchServer(env, ROOT)
    return server.start(argv, env, stdout, stderr, outputs) if server and server.serves(argv, env) else None


def stop_launch_servers() -> None:
    for server in _launch_servers.values():
        server.stop()
    _launch_servers.clear()


def start(argv: list[str], env_extra: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    env = child_env(env_extra)
    out = open(log, "w") if log else subprocess.PIPE
    job = forked(argv, env, out.fileno(), out.fileno(), []) if log else None
    if job is not None:
        out.close()  # the forked launch has its own copy of the descriptor
        return job
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(argv: list[str], env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = child_env(env_extra)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    try:
        proc = forked(argv, env, out_w, err_w, [out_r, err_r])
    finally:
        os.close(out_w)
        os.close(err_w)
    if proc is None:
        os.close(out_r)
        os.close(err_r)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)  # no rank may outlive the test and write into its folders
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# ------------------------------------------------------------------------------- jobs started early
# Jobs that mostly wait (a sleep longer than a timeout) start when the session starts, beside the rest of
# the suite (conftest.pytest_collection_finish); their test collects the result. {test node id: job}.
# Under pytest-xdist one worker starts them all and its watcher threads write each job's exit into the
# job's folder, so the test can run on any worker (`JobElsewhere`).
EARLY: dict = {}
EARLY_ROOT: Path | None = None  # under xdist: the folder every worker finds the early jobs' folders in


def started_early(starter):
    """Mark a test whose job `starter(folder) -> EarlyJob` runs from the session's start."""
    def mark(test):
        test.started_early = starter
        return test
    return mark


def early_folder(root: Path, nodeid: str) -> Path:
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)


class EarlyJob:
    """A launched job whose output goes to a log file (a pipe nobody reads would fill and stall it), and
    `drive(job)`, what the test does to it while it runs (wait for a step, signal it), on a thread that
    then waits for the job and writes its exit (`exit.json`) for a test on another worker."""

    def __init__(self, argv: list[str], env_extra: dict, folder: Path, drive=None):
        import threading

        self.folder, self.log, self.failure = folder, folder / "job.log", None
        self.proc = start(argv, env_extra, self.log)
        self.watcher = threading.Thread(target=self._watch, args=(drive,), daemon=True)
        self.watcher.start()

    def _watch(self, drive) -> None:
        try:
            if drive is not None:
                drive(self)
        except BaseException as e:  # noqa: BLE001 - raised in the test, by result()
            self.failure = e
        self.proc.wait()
        exit_ = {"returncode": self.proc.returncode, "failure": None if self.failure is None else repr(self.failure)}
        try:  # the folder is gone where the session was stopped and removed it
            (self.folder / "exit.json.tmp").write_text(json.dumps(exit_))
            os.replace(self.folder / "exit.json.tmp", self.folder / "exit.json")
        except OSError:
            pass

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(self.proc)
            raise
        self.watcher.join()
        if self.failure is not None:
            raise self.failure
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.log.read_text(), "")


class JobElsewhere:
    """An early job another xdist worker started: its result is read from its folder once it has exited."""

    def __init__(self, folder: Path):
        self.folder, self.log = folder, folder / "job.log"

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        exit_file = self.folder / "exit.json"
        assert wait_for(exit_file.exists, timeout=timeout, interval=0.5), f"early job in {self.folder} never ended"
        exit_ = json.loads(exit_file.read_text())
        if exit_["failure"] is not None:
            raise AssertionError(f"driving the early job failed: {exit_['failure']}")
        return subprocess.CompletedProcess([], exit_["returncode"], self.log.read_text(), "")


def early_job(request):
    """The job started early for this test: by this process, or by the xdist worker that starts them (its
    folder appears at collection); started now where neither did (a test run alone by a plugin that skips
    the hook). Its folder goes when the test ends."""
    nodeid = request.node.nodeid
    if nodeid in EARLY:
        job = EARLY.pop(nodeid)
    elif EARLY_ROOT is not None and wait_for((early_folder(EARLY_ROOT, nodeid) / "job.log").exists, timeout=60,
                                             interval=0.2):
        job = JobElsewhere(early_folder(EARLY_ROOT, nodeid))
    else:
        job = request.function.started_early(request.getfixturevalue("tmp_path"))
    request.addfinalizer(lambda: remove_early_folder(job.folder))
    return job


def remove_early_folder(folder: Path) -> None:
    """The job's folder, and the workers' shared one if this was its last (the worker that made it may have
    ended first)."""
    shutil.rmtree(folder, ignore_errors=True)
    if EARLY_ROOT is not None:
        try:
            EARLY_ROOT.rmdir()
        except OSError:  # not empty yet
            pass


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launched job, like a node crash: the launcher and every rank. torchrun starts each rank in
    its own session, so a group kill alone would leave ranks running; they are found as descendants
    first. Returns only when none of them is alive."""
    import psutil
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes of the killed job still alive: {[p.pid for p in alive]}"


def train(out_dir: Path, overrides=(), nproc: int = 2, resume: str | None = None, flags=(),
          fault: str | None = None, expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """A training job; with `fault`, it must print the fault's own line (it fired: phase, rank, and step
    when the spec names one), else the test fails here."""
    proc = run(train_argv(out_dir, overrides, nproc, resume, flags),
               {**(env or {}), **({"DS_FINETUNE_FAULT": fault} if fault else {})} or None)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if fault:
        assert fault_line(fault) in proc.stdout, f"{fault} never fired:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    return proc


def fault_line(fault: str) -> str:
    """What a fault prints when it fires (ds_finetune.faults): ` at PHASE rank R step [N]`."""
    from ds_finetune.faults import parse_fault
    phase, rank, step = parse_fault(fault)
    return f" at {phase} rank {rank} step" + ("" if step is None else f" {step}\n")


def read_jsonl(path: Path, strict: bool = True) -> list[dict]:
    """The rows of a JSONL file; not strict: stop at a torn last line (a writer killed mid-line)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            if strict:
                raise
            break
    return rows


def metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl of a run; strict, since it must read as one clean run after any resume."""
    return read_jsonl(Path(out_dir) / "metrics.jsonl")


def loss_reprs(rows: list[dict]) -> dict[int, str]:
    """step -> the loss exactly as written in the JSON (bitwise comparison)."""
    return {r["step"]: repr(r["loss"]) for r in rows}


def wait_for(predicate, timeout: float = 120, interval: float = 0.02, alive=None) -> bool:
    """Poll `predicate` until true or timeout; stops early when `alive()` says the job has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if alive is not None and not alive():
            return bool(predicate())
        time.sleep(interval)
    return False


def committed_steps(ckpt_dir: Path) -> list[int]:
    from ds_finetune.checkpoint.layout import MANIFEST, step_of_tag
    if not ckpt_dir.is_dir():
        return []
    return sorted(step_of_tag(p.name) for p in ckpt_dir.iterdir()
                  if step_of_tag(p.name) is not None and (p / MANIFEST).exists())


def assert_resumed(output, step: int | None = None) -> int:
    """The step a `--resume` continued from, read from rank 0's `resumed from PATH at step N` line in the
    launch's stdout (a CompletedProcess, or a log's text). A resume that finds no checkpoint starts fresh
    and, the run being deterministic, passes every bitwise comparison; so N > 0, PATH is step N's
    checkpoint, and N equals `step` where the test knows it. Returns N."""
    from ds_finetune.checkpoint.layout import tag_for_step
    text = output if isinstance(output, str) else output.stdout
    lines = re.findall(r"resumed from (.+) at step (\d+) \(", text)
    assert len(lines) == 1, f"expected one 'resumed from' line, found {len(lines)}:\n{text[-3000:]}"
    path, n = lines[0][0], int(lines[0][1])
    assert n > 0 and Path(path).name == tag_for_step(n), f"resumed from {path} at step {n}"
    assert step is None or n == step, f"resumed from step {n}, expected step {step}"
    return n


def assert_resumed_in_dry_run(line: str, ckpt_dir: Path, step: int) -> None:
    """`--dry-run`'s `# --resume continues from PATH at step N` line: a resume that would start fresh says
    otherwise, so N > 0, PATH is step N's checkpoint in `ckpt_dir`, and N is `step`."""
    from ds_finetune.checkpoint.layout import tag_for_step
    found = re.fullmatch(r"# --resume continues from (.+) at step (\d+)", line.strip())
    assert found, f"not a resume line: {line!r}"
    n = int(found.group(2))
    assert n == step > 0 and Path(found.group(1)) == ckpt_dir / tag_for_step(n), line


def kill_in_step5(out_dir: Path, overrides, **kwargs) -> subprocess.CompletedProcess:
    """A run SIGKILLed on rank 1 inside step 5's accumulation; checks the kill happened and step 4 is its
    newest commit (the checkpoint a resume must continue from)."""
    killed = train(out_dir, overrides, fault="mid_accum:rank1@step5", expect_ok=False, **kwargs)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stdout[-2000:]
    assert committed_steps(out_dir / "checkpoints")[-1] == 4
    return killed


# ------------------------------------------------------------------------------------- comparing runs

def assert_same_metrics(got_dir: Path, ref_dir: Path, names) -> None:
    """Each metric of `names` bitwise the reference's at every step (absent at the same steps)."""
    rows, ref_rows = metrics(got_dir), metrics(ref_dir)
    for name in names:
        assert [repr(r.get(name)) for r in rows] == [repr(r.get(name)) for r in ref_rows], name


def assert_same_run(got_dir: Path, ref_dir: Path) -> None:
    """Bitwise: same steps, the same losses as written in the JSON, the same sample ids, lrs and grad norms."""
    got, ref = metrics(got_dir), metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref], "metrics.jsonl must read as one clean run"
    assert loss_reprs(got) == loss_reprs(ref)
    assert [r.get("sample_ids") for r in got] == [r.get("sample_ids") for r in ref]
    assert [r["learning_rate"] for r in got] == [r["learning_rate"] for r in ref]
    assert [r.get("grad_norm") for r in got] == [r.get("grad_norm") for r in ref]


def assert_close_run(got_dir: Path, ref_dir: Path, rel: float = 1e-5) -> None:
    """Across stages, world sizes or nodes: the same steps and samples, losses within float noise."""
    import pytest
    got, ref = metrics(got_dir), metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref], "metrics.jsonl must read as one clean run"
    assert [r.get("sample_ids") for r in got] == [r.get("sample_ids") for r in ref]
    for a, b in zip(ref, got):
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-12), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a["step"], a["loss"], b["loss"])


def assert_same_final_weights(got_dir: Path, ref_dir: Path) -> None:
    """The newest checkpoints of both runs hold bitwise the same full fp32 weights."""
    import torch

    from ds_finetune.checkpoint.verify import find_resumable_checkpoint
    got, _ = find_resumable_checkpoint(Path(got_dir) / "checkpoints")
    ref, _ = find_resumable_checkpoint(Path(ref_dir) / "checkpoints")
    assert got.step == ref.step, (got.path, ref.path)
    a, b = consolidate(got, weights_only=True)[0]["weights"], consolidate(ref, weights_only=True)[0]["weights"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------- run folders, errors

def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(folder: Path) -> list:
    """Every file under `folder` with its size and modification time: equal snapshots, nothing touched."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


def target_runs(ids, mask) -> list[list[int]]:
    """The runs of consecutive target tokens of a row (each reply's targets, in order)."""
    runs, current = [], []
    for t, m in zip(list(ids), list(mask)):
        if m:
            current.append(int(t))
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def assert_one_line_error(proc, *needles, code: int | None = None, last: bool = False, alone: bool = False) -> str:
    """A user error: non-zero exit (`code` when given), exactly one `error:` line naming every needle, no
    traceback. `last`: that line ends stderr (the last thing the user sees). `alone`: stderr is that line
    and stdout is empty (nothing was launched or printed before the error)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and code in (None, proc.returncode), (proc.returncode, out[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in out, out[-3000:]
    if last:
        assert lines[0] == proc.stderr.strip().splitlines()[-1]
    if alone:
        assert proc.stdout == "", "nothing is launched or printed before the error"
        assert proc.stderr.rstrip("\n") == lines[0], f"not one line: {proc.stderr!r}"
        assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------ in-process pieces

def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model(*overrides: str, seed: int = 0):
    """The model of configs/tiny.yaml (with `overrides`, as on the command line), built as training builds
    it, its random init drawn from torch's RNG seeded with `seed`."""
    import torch

    from ds_finetune.config import load_config
    from ds_finetune.model import build_model

    cfg = load_config(TINY, ["output_dir=/tmp/unused", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg, {})


def save_tiny_model(folder: Path, seed: int) -> Path:
    """The tiny model (dropout on, as in BASE), seeded as a run seeds it, saved as a pretrained folder."""
    from ds_finetune.config import load_config
    from ds_finetune.dist import seed_everything
    from ds_finetune.model import build_model

    cfg = load_config(TINY, [f"output_dir={folder / 'unused'}", "model.config.attention_dropout=0.1"])
    seed_everything(seed)
    build_model(cfg, {}).save_pretrained(folder)
    return folder


def consolidate(info, weights_only: bool = False) -> tuple[dict[str, dict], dict]:
    """The whole model of a verified checkpoint at once: ({key: {param name: fp32 tensor}}, meta). For
    tests and small models; conversion and export stream instead."""
    from ds_finetune.checkpoint import reshard

    src = reshard.open_source(info)
    keys = ("weights",) if weights_only else reshard.TENSOR_FILES
    return {key: {name: src.read(name, key) for name in src.names} for key in keys}, reshard.source_meta(info, src)


def step_slice(layout, offset: int) -> slice:
    """The entries of the epoch order that the step starting at `offset` takes (a `BatchLayout`'s)."""
    return slice(offset, offset + layout.global_batch)
