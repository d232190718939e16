"""Stand-ins for `srun`, `scontrol`, `scancel` and a node's `ds-finetune`, enough to run launch/slurm.sbatch on
one machine in tests. Called as `fake_slurm.py TOOL ARGS...` (the test puts one-line wrappers named after each
tool on PATH). State lives in $FAKE_SLURM_DIR: `calls` (one JSON list per call), the step's task process
groups (what scancel signals, like slurmstepd does) and one `taskN.json` per node task.

Only what the template uses is emulated: `srun --ntasks-per-node=1 [--kill-on-bad-exit=1] CMD...` starts CMD
once per node of $SLURM_JOB_NODELIST (comma-separated) with SLURM_NODEID/SLURM_PROCID set and returns the
highest exit status (128+signal for a task killed by a signal); `scancel --signal=SIG JOB` signals every
process of the step's tasks; `scontrol show hostnames LIST` / `scontrol requeue JOB`.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])


def record(*words: str) -> None:
    with open(STATE / "calls", "a") as f:
        f.write(json.dumps(list(words)) + "\n")


def srun(args: list[str]) -> int:
    opts = []
    while args and args[0].startswith("--"):
        opts.append(args.pop(0))
    record("srun", *opts)
    tasks = []
    for i, node in enumerate(os.environ["SLURM_JOB_NODELIST"].split(",")):
        env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURMD_NODENAME=node)
        tasks.append(subprocess.Popen(args, env=env, start_new_session=True))
    (STATE / "step_pgids").write_text(" ".join(str(t.pid) for t in tasks))
    codes: dict[int, int] = {}
    while len(codes) < len(tasks):
        for t in tasks:
            if t.pid in codes or t.poll() is None:
                continue
            codes[t.pid] = t.returncode if t.returncode >= 0 else 128 - t.returncode
            if codes[t.pid] != 0 and "--kill-on-bad-exit=1" in opts:
                for other in tasks:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
        time.sleep(0.02)
    return max(codes.values())


def scancel(args: list[str]) -> int:
    record("scancel", *args)
    sig = next((a.split("=", 1)[1] for a in args if a.startswith("--signal=")), "KILL")
    for pgid in (STATE / "step_pgids").read_text().split():
        try:
            os.killpg(int(pgid), getattr(signal, f"SIG{sig}"))
        except ProcessLookupError:
            pass
    return 0


def scontrol(args: list[str]) -> int:
    record("scontrol", *args)
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(args[2].split(",")))
    return 0


def task(args: list[str]) -> int:
    """A node's ds-finetune: records its argv, checks it with the real CLI (--dry-run), then trains until
    SIGTERM (exit 143, as a stopped run does) or exits with $FAKE_TASK_EXIT."""
    node = os.environ["SLURM_NODEID"]
    terminated = []

    def on_term(*_):
        (STATE / f"task{node}.terminated").write_text("")
        terminated.append(True)
    signal.signal(signal.SIGTERM, on_term)
    dry = subprocess.run([os.environ["REAL_DS_FINETUNE"], *args, "--dry-run"], capture_output=True, text=True)
    hostfile = Path(args[args.index("--hostfile") + 1]) if "--hostfile" in args else None
    report = {"argv": args, "node_id": node, "dry_run_code": dry.returncode,
              "hostfile": hostfile.read_text() if hostfile else None,
              "dry_run_first_line": (dry.stdout.splitlines() or [dry.stderr])[0],
              "dry_run_resume_line": next((line for line in dry.stdout.splitlines() if "--resume" in line
                                           and line.startswith("# ")), None)}
    (STATE / f"task{node}.json").write_text(json.dumps(report))
    if "FAKE_TASK_EXIT" in os.environ:
        return int(os.environ["FAKE_TASK_EXIT"])
    # Like real ranks, which agree on the stop through the step's all-reduce and save together, a task
    # exits only once every task got the signal (else srun's --kill-on-bad-exit would race the others).
    while not terminated:
        time.sleep(0.02)
    nodes = len(os.environ["SLURM_JOB_NODELIST"].split(","))
    deadline = time.time() + 30
    while len(list(STATE.glob("task*.terminated"))) < nodes and time.time() < deadline:
        time.sleep(0.02)
    return 128 + signal.SIGTERM


if __name__ == "__main__":
    tool, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"srun": srun, "scancel": scancel, "scontrol": scontrol, "ds-finetune": task}[tool](rest))
