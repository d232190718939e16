"""Launching test jobs through tests/scripts/launch_server.py: a server per pytest process that has imported
torch, DeepSpeed and transformers once and forks each `python SCRIPT ...` launch from there (the server's
doc says what a forked launch is). `LaunchServer.start` returns a `ForkedJob`, which answers what the tests
ask of a subprocess.Popen: pid (its own session, so harness.kill_job and killpg work as for a Popen),
poll, wait, send_signal, kill, communicate, returncode.

A launch goes through a server only where a new interpreter would compute the same: argv `[python,
SCRIPT, ...]` with this interpreter, and an environment that differs from the server's only in variables
read at run time (not at import, as HF_*, TRANSFORMERS_*, TORCH*, DS_ACCELERATOR... are; `import_key`). A
launch whose variables read at import differ from every server's gets a server of its own (a test process
whose environment changed, e.g. TOKENIZERS_PARALLELISM set by a tokenizer it used), up to MAX_SERVERS;
anything else, or a server that is gone, starts a new interpreter as before. The conftest turns the server on for the
suite (DS_FINETUNE_TEST_FORK=0 turns it off); the bench never uses it.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "scripts" / "launch_server.py"
# Read at import by torch, DeepSpeed, transformers or huggingface_hub: a launch whose value differs from the
# server's starts a new interpreter.
READ_AT_IMPORT = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "DS_ACCELERATOR", "DS_BUILD", "DEEPSPEED",
                  "CUDA", "NCCL", "MKL", "KMP", "TOKENIZERS", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
                  "PYTHONWARNINGS", "ACCELERATE", "TRITON", "XDG_CACHE_HOME", "HOME")
MAX_SERVERS = 3  # a pytest process's servers, one an import environment (each holds ~0.4 GB, mostly shared)


class ForkedJob:
    """A launch forked by the server, with the part of subprocess.Popen's interface the tests use. A thread
    waits for the server's word of its exit, so any thread may poll or wait."""

    def __init__(self, conn: socket.socket, pid: int, argv: list[str], outputs: list[int]):
        import threading

        self.pid, self.args, self.returncode = pid, argv, None
        self._outputs = outputs  # our read ends of the launch's stdout and stderr pipes (communicate)
        self._exited = threading.Event()
        threading.Thread(target=self._await_exit, args=(conn,), daemon=True).start()

    def _await_exit(self, conn: socket.socket) -> None:
        try:
            message = conn.recv(64)
        except OSError:
            message = b""
        conn.close()
        # nothing: the server died, and with it our word of the launch (which runs on in its own session)
        self.returncode = int(message) if message else -signal.SIGKILL
        self._exited.set()

    def poll(self):
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) read to their end, then the exit; TimeoutExpired as Popen's."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = {fd: [] for fd in self._outputs}
        selector = selectors.DefaultSelector()
        for fd in self._outputs:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        finally:
            selector.close()
        for fd in self._outputs:
            os.close(fd)
        self._outputs = []
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(b"".join(c).decode(errors="replace") for c in chunks.values())


def import_key(env: dict) -> tuple:
    """The variables of `env` read at import: launches with the same key can share a server."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(READ_AT_IMPORT)))


class LaunchServer:
    def __init__(self, env: dict, cwd: Path):
        self.env, self.cwd, self.key = env, cwd, import_key(env)
        self.path = Path(tempfile.mkdtemp(prefix="launch-server-")) / "socket"
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(self.path)], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def serves(self, argv: list[str], env: dict) -> bool:
        """Whether a launch of `argv` in `env` computes in a forked child what it would in a new interpreter."""
        if len(argv) < 2 or argv[0] != sys.executable or not argv[1].endswith(".py") or self.proc.poll() is not None:
            return False
        return import_key(env) == self.key

    def start(self, argv: list[str], env: dict, stdout: int, stderr: int, outputs: list[int]) -> ForkedJob | None:
        """The launch forked, writing to the descriptors `stdout` and `stderr` (ours to close); None where the
        server is not up (the caller starts a new interpreter)."""
        deadline = time.monotonic() + 120  # the server's imports, on a loaded machine
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(str(self.path))
            socket.send_fds(conn, [json.dumps({"argv": argv, "env": env, "cwd": str(self.cwd)}).encode()],
                            [stdout, stderr])
            pid = int(conn.recv(64))
        except (OSError, ValueError):
            conn.close()
            return None
        return ForkedJob(conn, pid, argv, outputs)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.path.unlink(missing_ok=True)
        self.path.parent.rmdir()
