"""The tests' launcher: start N ranks of a script on this machine with the variables torchrun gives them.

    python tests/scripts/launch_ranks.py NPROC MASTER_PORT SCRIPT [ARGS...]

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and
OMP_NUM_THREADS=1 unless set (as torchrun). SIGINT and SIGTERM are passed on to the ranks. When a rank
fails, the others get a moment to exit on their own (a user error reaches every rank), then are killed.
The exit status is the first failed rank's: its code, or the signal that killed it; 0 when all succeed.

The ranks are forked from this process once it has imported the libraries every rank imports (torch,
DeepSpeed, transformers' Llama and tokenizer code): those imports are ~4.5 s of CPU a rank here, most of
a tiny test run's start and the largest cost of the suite, and forked ranks share them. Nothing is set up
before the fork (no process group, device, thread pool or tokenizer use); each rank then runs SCRIPT as
`__main__`, as a new interpreter would, with its own code (ds_finetune) imported after the fork, from
where the script puts it. The real launchers are tested through `ds-finetune train` (the `deepspeed`
launcher) and the bench.
"""
import os
import runpy
import signal
import sys
import time
import traceback

GRACE_S = 2.0


def preload() -> None:
    """Import, before the fork, the third-party modules every rank imports."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch starts its thread pool (after the fork)
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import torch  # noqa: F401
    import transformers

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "LlamaConfig", "LlamaForCausalLM"):
        getattr(transformers, name)  # transformers imports each on first access


class ForkedRank:
    """A forked rank, with the part of subprocess.Popen's interface the launcher uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # a signal: its negative number
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_as_interpreter(prepare) -> None:
    """In a forked child: `prepare()` (which makes the process what it should be and returns the script's
    argv), then the script run as `__main__`, and the exit a `python SCRIPT` would end with; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter sets them
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = list(prepare())
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as a failed interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_rank(variables: dict, argv: list[str]) -> None:
    """In the forked child: become rank `variables["RANK"]` and run the script; never returns."""
    def prepare():
        os.environ.update(variables)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` would
        return argv
    run_as_interpreter(prepare)


def start_ranks(nproc: int, port: str, argv: list[str]) -> list[ForkedRank]:
    preload()
    procs = []
    for rank in range(nproc):
        variables = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_rank(variables, argv)
        procs.append(ForkedRank(pid))
    return procs


def wait_for_ranks(procs: list[ForkedRank]) -> int:
    """The first failed rank's return code (negative: a signal), or 0."""
    first_failure, failed_at = 0, None
    while any(p.poll() is None for p in procs):
        if first_failure == 0:
            first_failure = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
            failed_at = time.monotonic() if first_failure else None
        elif time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                p.kill()
        time.sleep(0.05)
    return first_failure or next((p.returncode for p in procs if p.returncode), 0)


def main() -> None:
    nproc, port, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    procs = start_ranks(nproc, port, argv)

    def forward(signum, _frame):
        for p in procs:
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
