"""The tests' launch server: one per pytest process, it imports what every launch imports (torch, DeepSpeed,
transformers' Llama and tokenizer code: ~4.5 s of CPU here, the largest cost of a tiny test run and, over
the ~250 launches of the suite, about a third of its CPU) once, and then forks each launch from there.

    python tests/scripts/launch_server.py SOCKET

A request (tests/launch_server.py sends it) is one SEQPACKET message on SOCKET: JSON {argv, env, cwd} with
two file descriptors, the launch's stdout and stderr. argv is `[python, SCRIPT, ARGS...]`; the forked child
becomes what `python SCRIPT ARGS...` started in a new session would be: its own session, stdin /dev/null,
those stdout and stderr, the request's working folder and environment, sys.argv and sys.path as a new
interpreter sets them (SCRIPT's folder, PYTHONPATH, the standard paths), and SCRIPT run as `__main__`. The
server answers the child's pid, then its exit code when it ends (negative: the signal that ended it).
Nothing is set up before the fork: no thread, process group, device or RNG use, and none of ds_finetune
(each launch imports its own, from where its sys.path says). The client sends only requests whose
environment differs from the server's in variables read at run time, not at import (see the client).

The server ends when its parent (the pytest process) is gone.
"""
import json
import os
import selectors
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch_ranks import preload, run_as_interpreter  # noqa: E402  (the imports every rank shares)


def become(request: dict, fds: list[int], sockets: list) -> None:
    """In the forked child: the launch `request` describes; never returns."""
    def prepare():
        for s in sockets:
            s.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script, argv = request["argv"][1], request["argv"][1:]
        pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.abspath(script)), *pythonpath, *STANDARD_PATHS]
        return argv
    run_as_interpreter(prepare)


def serve(path: str) -> None:
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> the connection waiting for its exit code
    while os.getppid() == parent:
        for _ in selector.select(timeout=0.05):
            conn, _ = server.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                become(json.loads(message), fds, [server, conn, *children.values()])
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:  # the client is gone
                    pass
                conn.close()


if __name__ == "__main__":
    preload()
    # The interpreter's own paths, less this script's folder and the server's PYTHONPATH: a launch's sys.path
    # is its script's folder, its own PYTHONPATH, then these.
    own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    STANDARD_PATHS = [p for p in sys.path[1:] if os.path.abspath(p) not in own and
                      os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    serve(sys.argv[1])
