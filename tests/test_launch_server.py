"""The tests' launch server (tests/launch_server.py): a forked launch sees what a new interpreter would (its
argv, environment, working folder, sys.path, a fresh session), its output and exit code (or signal) come
back as a Popen's would, harness.kill_job kills it and its children, and a launch whose environment changes
a variable read at import is not forked from a server of another such environment."""
import os
import signal
import subprocess
import sys
import time

import pytest

import harness
from launch_server import LaunchServer

pytestmark = pytest.mark.multiproc

SCRIPT = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "value": os.environ.get("VALUE"),
                  "session": os.getsid(0) == os.getpid(), "imported_ours": "ds_finetune" in sys.modules}))
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture(scope="module")
def server():
    s = LaunchServer(harness.child_env(), harness.ROOT)
    yield s
    s.stop()


def launch(server, script, env_extra=None):
    env = harness.child_env(env_extra)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    job = server.start([sys.executable, str(script), "a", "b"], env, out_w, err_w, [out_r, err_r])
    os.close(out_w)
    os.close(err_w)
    assert job is not None and server.serves([sys.executable, str(script)], env)
    return job


def test_a_forked_launch_is_what_a_new_interpreter_would_run(server, tmp_path):
    import json
    script = tmp_path / "show.py"
    script.write_text(SCRIPT)
    job = launch(server, script, {"VALUE": "x", "CODE": "3"})
    out, err = job.communicate(timeout=120)
    assert job.returncode == 3 and err.strip() == "to stderr"
    seen = json.loads(out)
    assert seen == {"argv": [str(script), "a", "b"], "cwd": str(harness.ROOT), "path0": str(tmp_path), "value": "x",
                    "session": True, "imported_ours": False}


def test_a_signal_ends_it_as_a_popen_reports_and_kill_job_kills_its_children(server, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                      f"open({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
                      "time.sleep(600)\n")
    job = launch(server, script)
    assert harness.wait_for(lambda: (tmp_path / "child").exists(), timeout=60)
    child = int((tmp_path / "child").read_text())
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(timeout=0.2)
    harness.kill_job(job)
    assert job.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)
    term = launch(server, script)
    assert harness.wait_for(lambda: os.path.exists(f"/proc/{term.pid}"), timeout=10)
    term.send_signal(signal.SIGTERM)
    assert term.wait(timeout=60) == -signal.SIGTERM
    harness.kill_job(term)


def test_a_variable_read_at_import_needs_a_server_of_its_own(server):
    """A server forks only launches whose import-time variables are its own (the harness starts another server
    for another such environment); a launch of something other than `python SCRIPT` is never forked."""
    argv = [sys.executable, str(harness.ROOT / "launch" / "train.py")]
    assert server.serves(argv, harness.child_env({"DS_FINETUNE_FAULT": "x", "PYTHONPATH": "/tmp"}))
    assert not server.serves(argv, harness.child_env({"HF_HOME": "/elsewhere"}))
    assert not server.serves(argv, harness.child_env({"TOKENIZERS_PARALLELISM": "false"}))
    assert not server.serves([str(harness.BIN / "ds-finetune"), "train"], harness.child_env())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
