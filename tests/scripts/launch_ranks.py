"""The tests' launcher: start N ranks of a script on this machine with the variables torchrun gives them,
without importing torch (torchrun takes ~3.5 s a start here, a third of a tiny run).

    python tests/scripts/launch_ranks.py NPROC MASTER_PORT SCRIPT [ARGS...]

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and
OMP_NUM_THREADS=1 unless set (as torchrun). SIGINT and SIGTERM are passed on to the ranks. When a rank
fails, the others get a moment to exit on their own (a user error reaches every rank), then are killed.
The exit status is the first failed rank's: its code, or the signal that killed it; 0 when all succeed.
The real launchers are tested through `ds-finetune train` (the `deepspeed` launcher) and the bench.
"""
import os
import signal
import subprocess
import sys
import time

GRACE_S = 2.0


def start_ranks(nproc: int, port: str, argv: list[str]) -> list[subprocess.Popen]:
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env.setdefault("OMP_NUM_THREADS", "1")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env))
    return procs


def wait_for_ranks(procs: list[subprocess.Popen]) -> int:
    """The first failed rank's return code (negative: a signal), or 0."""
    first_failure, failed_at = 0, None
    while any(p.poll() is None for p in procs):
        if first_failure == 0:
            first_failure = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
            failed_at = time.monotonic() if first_failure else None
        elif time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return first_failure or next((p.returncode for p in procs if p.returncode), 0)


def main() -> None:
    nproc, port, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    procs = start_ranks(nproc, port, argv)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = wait_for_ranks(procs)
    if code < 0:  # end as the rank did, so the caller sees the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
