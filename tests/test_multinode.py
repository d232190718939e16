"""Training, resume and errors on more than one node: a hostfile run over two real "nodes" (two network namespaces
joined by a veth pair, gloo over that link) computes what one node computes, is killed and resumed exactly,
resumes on fewer nodes, and refuses a checkpoint dir that the nodes do not share.

Each node runs `ds-finetune train --hostfile H --no-ssh --node-rank i --master-addr 10.213.0.1` (DeepSpeed's
`deepspeed --no_ssh --node_rank=i` underneath), one rank per node, in its own network and UTS namespace
(hostname node0 / node1). Where namespaces cannot be made (not root, no `ip`), the netns variant is skipped
with the reason and the same tests run as two node ranks on 127.0.0.1 (DS_FINETUNE_TEST_NETNS=0 forces that).

Exactness across node layouts: a 2-node run (1 rank per node) and the 1-node 2-rank reference are compared
to 1e-5, not bitwise: each rank sizes its intra-op thread pool to its node's share of the cores
(train.init_distributed), 2 threads per rank here vs 1 in the reference, and on other machines other
counts, which may change the float reduction order inside the kernels (on this 2-core machine the tiny
model's losses came out bitwise equal anyway; nothing promises that). Kill + resume on the same 2 nodes is
compared bitwise with an uninterrupted 2-node run (same layout).
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness
from conftest import made_once
from ds_finetune import nodes

SUBNET = "10.213.0"          # this test's own subnet, only inside its namespaces
MASTER_NETNS = f"{SUBNET}.1"
SETTINGS = ["train.zero_stage=2", "model.config.attention_dropout=0.0"]  # = the reference_run(2, extra=...) key
CLI = str(harness.BIN / "ds-finetune")


# ------------------------------------------------------------------------------------------- the nodes

@dataclass
class Node:
    index: int
    host: str
    netns: str | None
    ifname: str


@dataclass
class Cluster:
    mode: str                       # "netns" | "loopback"
    master_addr: str
    nodes: list[Node]
    ports = itertools.count(29611)

    def port(self) -> int:
        return next(self.ports) if self.mode == "netns" else harness.free_port()

    def command(self, node: Node, argv: list[str], private_dir: Path | None = None) -> list[str]:
        """argv as it runs on `node`: in its namespaces, hostname set; with `private_dir` hidden under a tmpfs
        only this node sees (its output_dir is then not shared)."""
        if self.mode == "loopback":
            assert private_dir is None, "loopback nodes share every mount"
            return argv
        unshare = ["unshare", "--uts"] + (["--mount", "--propagation", "private"] if private_dir else [])
        script = ('hostname "$0" || exit 1; if [ -n "$1" ]; then mount -t tmpfs node-local "$1" || exit 1; fi; '
                  'shift; exec "$@"')
        return ["ip", "netns", "exec", node.netns, *unshare, "sh", "-c", script, node.host,
                str(private_dir or ""), *argv]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def make_netns_cluster() -> Cluster:
    tag = f"{os.getpid() % 100000}"
    ns = [f"dsft{tag}n{i}" for i in (0, 1)]
    veth = [f"dsft{tag}v{i}" for i in (0, 1)]
    try:
        for name in ns:
            _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i in (0, 1):
            _sh("ip", "link", "set", veth[i], "netns", ns[i])
            _sh("ip", "-n", ns[i], "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", veth[i])
            _sh("ip", "-n", ns[i], "link", "set", veth[i], "up")
            _sh("ip", "-n", ns[i], "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", ns[0], "unshare", "--uts", "--mount", "true")
    except (OSError, subprocess.SubprocessError) as e:
        delete_netns(ns, veth)
        detail = getattr(e, "stderr", None) or str(e)
        raise RuntimeError(detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
    return Cluster("netns", MASTER_NETNS, [Node(i, f"node{i}", ns[i], veth[i]) for i in (0, 1)])


def delete_netns(ns: list[str], veth: list[str]) -> None:
    if shutil.which("ip") is None:
        return
    for name in ns:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # only processes this test started live in its namespaces
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for name in veth:  # gone with its namespace, unless setup failed before moving it
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture(scope="module", params=["netns", "loopback"])
def cluster(request):
    if request.param == "netns":
        if os.environ.get("DS_FINETUNE_TEST_NETNS") == "0":
            pytest.skip("network namespaces turned off by DS_FINETUNE_TEST_NETNS=0; the loopback variant runs the "
                        "same tests on 127.0.0.1")
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            pytest.skip("network namespaces: `ip` (iproute2) or `unshare` is not installed; the loopback variant "
                        "runs the same tests on 127.0.0.1")
        try:
            made = make_netns_cluster()
        except RuntimeError as e:
            reason = (f"network namespaces are not permitted here ({e}); the loopback variant runs the same tests "
                      f"as two node ranks on 127.0.0.1")
            print(f"\n[test_multinode] {reason}")
            pytest.skip(reason)
        try:
            yield made
        finally:
            delete_netns([n.netns for n in made.nodes], [n.ifname for n in made.nodes])
        return
    if _netns_works():
        pytest.skip("network namespaces work here, so the netns variant ran these tests on two real nodes")
    yield Cluster("loopback", "127.0.0.1", [Node(i, f"node{i}", None, "lo") for i in (0, 1)])


_NETNS_OK: list[bool] = []


def _netns_works() -> bool:
    if os.environ.get("DS_FINETUNE_TEST_NETNS") == "0" or shutil.which("ip") is None or shutil.which("unshare") is None:
        return False
    if not _NETNS_OK:
        try:
            made = make_netns_cluster()
            delete_netns([n.netns for n in made.nodes], [n.ifname for n in made.nodes])
            _NETNS_OK.append(True)
        except RuntimeError:
            _NETNS_OK.append(False)
    return _NETNS_OK[0]


# -------------------------------------------------------------------------------------------- the runs

def write_hostfile(path: Path, hosts: list[str]) -> Path:
    path.write_text("".join(f"{h} slots=1\n" for h in hosts))
    return path


def node_argv(cluster: Cluster, i: int, out: Path, hostfile: Path, port: int, resume: bool, extra=()) -> list[str]:
    return [CLI, "train", str(harness.TINY), "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(i),
            "--master-addr", cluster.master_addr, "--master-port", str(port), *(["--resume"] if resume else []),
            *harness.BASE, *SETTINGS, *extra, f"output_dir={out}"]


def start_nodes(cluster: Cluster, out: Path, hosts=(0, 1), resume=False, extra=(), private: dict | None = None,
                outputs: dict | None = None) -> list[tuple[subprocess.Popen, Path]]:
    """Start one `ds-finetune train --no-ssh` per node (each in its own session, so a killpg is a node crash)."""
    hostfile = write_hostfile(out.parent / f"{out.name}.hosts{len(hosts)}", [cluster.nodes[i].host for i in hosts])
    port = cluster.port()
    started = []
    for node_rank, i in enumerate(hosts):
        node = cluster.nodes[i]
        node_out = (outputs or {}).get(i, out)
        argv = cluster.command(node, node_argv(cluster, node_rank, node_out, hostfile, port, resume, extra),
                               (private or {}).get(i))
        log = out.parent / f"{out.name}.node{i}.{time.monotonic_ns()}.log"
        started.append((harness.start(argv, {"GLOO_SOCKET_IFNAME": node.ifname}, log=log), log))
    return started


def wait_nodes(started, timeout: float = 300) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    results = []
    for proc, log in started:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p, _ in started:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"nodes did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        results.append((code, log.read_text()))
    return results


def run_nodes(cluster: Cluster, out: Path, **kw) -> list[str]:
    results = wait_nodes(start_nodes(cluster, out, **kw))
    for i, (code, text) in enumerate(results):
        assert code == 0, f"node {i} exited {code}:\n{text[-4000:]}"
    return [text for _, text in results]


def newest_manifest(out: Path) -> dict:
    import json
    from ds_finetune.checkpoint.layout import MANIFEST, tag_for_step
    step = harness.committed_steps(out / "checkpoints")[-1]
    return json.loads((out / "checkpoints" / tag_for_step(step) / MANIFEST).read_text())


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """An uninterrupted 2-node run of harness.BASE (dropout off), and each node's log: once for the session,
    whichever worker's cluster runs it first (the run's files do not depend on the cluster's addresses)."""
    def run(folder):
        t0 = time.time()
        for i, log in enumerate(run_nodes(cluster, folder / "run")):
            (folder / f"node{i}.log").write_text(log)
        print(f"\n[test_multinode] uninterrupted 2-node run ({cluster.mode}): {time.time() - t0:.1f} s")
    folder = made_once(tmp_path_factory, f"two-node-{cluster.mode}", run)
    return folder / "run", [(folder / f"node{i}.log").read_text() for i in range(2)]


# ------------------------------------------------------------------------------------------- the tests

@pytest.mark.multiproc
def test_two_nodes_compute_what_one_node_computes(cluster, two_node_run, reference_run):
    out, logs = two_node_run
    assert "done: 10 steps" in logs[0], logs[0][-3000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1], logs[1][-3000:]
    assert harness.committed_steps(out / "checkpoints")[-1] == 10
    assert newest_manifest(out)["world_size"] == 2
    harness.assert_close_run(out, reference_run(2, extra=["model.config.attention_dropout=0.0"]))
    assert not list((out / "checkpoints").glob(f"{nodes.PROBE_PREFIX}*")), "the shared-dir probes are removed"


@pytest.mark.multiproc
def test_both_nodes_killed_resume_exactly_and_on_fewer_nodes(cluster, two_node_run, reference_run, tmp_path):
    """SIGKILL of both nodes' process groups after a checkpoint; `--resume` on both nodes continues bitwise
    as the uninterrupted 2-node run. The same checkpoint resumed on node 0 alone (1 rank) is converted to
    the new world size, keeps the global batch and the order, and matches to float noise."""
    out = tmp_path / "run"
    t0 = time.time()
    started = start_nodes(cluster, out)
    reached = harness.wait_for(lambda: len(harness.committed_steps(out / "checkpoints")) >= 2
                               or any(p.poll() is not None for p, _ in started), timeout=240, interval=0.01)
    for proc, _ in started:
        os.killpg(proc.pid, signal.SIGKILL)
    results = wait_nodes(started)
    assert reached and all(code == -signal.SIGKILL for code, _ in results), [r[1][-2000:] for r in results]
    done = harness.metrics(out)
    assert len(done) < 10, "the run finished before the kill; nothing was tested"
    last = harness.committed_steps(out / "checkpoints")[-1]
    t_kill = time.time() - t0

    fewer = tmp_path / "fewer"
    shutil.copytree(out, fewer)

    # Both resumes at once (independent folders; node 0 runs the 1-node one beside its 2-node rank).
    t0 = time.time()
    on_two = start_nodes(cluster, out, resume=True)
    on_one = start_nodes(cluster, fewer, hosts=(0,), resume=True)
    results = wait_nodes(on_two) + wait_nodes(on_one)
    elapsed = time.time() - t0
    for code, text in results:
        assert code == 0, text[-4000:]
    logs = [text for _, text in results]
    assert f"resumed from {out / 'checkpoints'}" in logs[0], logs[0][-3000:]
    harness.assert_resumed(logs[0], step=last)
    harness.assert_same_run(out, two_node_run[0])

    harness.assert_resumed(logs[2], step=last)
    assert "converting" in logs[2] and "on 1 ranks" in logs[2], logs[2][-3000:]
    assert "keeping the checkpoint's global batch 8 on 1 ranks: grad_accum=4" in logs[2]
    harness.assert_close_run(fewer, reference_run(2, extra=["model.config.attention_dropout=0.0"]))
    print(f"\n[test_multinode] killed after step {len(done)} (last commit {last}): {t_kill:.1f} s; 2-node and "
          f"1-node resumes side by side: {elapsed:.1f} s ({cluster.mode})")


@pytest.mark.multiproc
def test_a_node_whose_output_dir_is_not_shared_is_named_in_one_line(cluster, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    if cluster.mode == "netns":
        kw = {"private": {1: out}}  # node 1 sees an empty tmpfs at the same path
    else:
        kw = {"outputs": {1: tmp_path / "node1-local"}}  # node 1's output_dir is another folder
    t0 = time.time()
    results = wait_nodes(start_nodes(cluster, out, **kw))
    elapsed = time.time() - t0
    assert [code for code, _ in results] == [2, 2], [r[1][-2000:] for r in results]
    text = results[0][1]
    assert "Traceback" not in text + results[1][1]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    host1 = "node1" if cluster.mode == "netns" else socket.gethostname()  # loopback nodes share one hostname
    for needle in ("not shared", str(out / "checkpoints"), "rank 0 on", f"node 1 ({host1}: rank 1)", "output_dir"):
        assert needle in errors[0], errors[0]
    assert not list((out / "checkpoints").glob(f"{nodes.PROBE_PREFIX}*"))
    assert not harness.metrics(out)
    print(f"\n[test_multinode] not-shared refusal on 2 nodes: {elapsed:.1f} s ({cluster.mode})")


# ------------------------------------------------------------------- the probe itself, in one process

def test_the_shared_dir_check_neither_waits_nor_syncs_when_every_probe_is_seen_and_leaves_no_files(
        one_rank_group, tmp_path, monkeypatch):
    """Every start runs the check: where the folder is shared it costs a small file a rank and two
    collectives, never the grace period's wait for a late probe nor an fsync."""
    ckpt_dir = tmp_path / "out" / "checkpoints"
    waits, syncs = [], []
    monkeypatch.setattr(nodes.time, "sleep", waits.append)
    monkeypatch.setattr(os, "fsync", syncs.append)
    for _ in range(2):
        nodes.check_shared_checkpoint_dir(ckpt_dir, 0, 1)
    assert (waits, syncs) == ([], [])
    assert list(ckpt_dir.iterdir()) == []


def reports(*hosts_and_node_ranks, error=None):
    return [{"host": h, "node_rank": n, "error": error} for h, n in hosts_and_node_ranks]


def test_probes_rank_0_cannot_see_name_their_nodes(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "local-b"
    for r in (0, 1):
        nodes.write_probe(shared, "n0nce", r)
    for r in (2, 3):
        nodes.write_probe(local, "n0nce", r)
    rep = reports(("host-a", 0), ("host-a", 0), ("host-b", 1), ("host-b", 1))
    message = nodes.shared_dir_verdict(shared, "n0nce", rep, grace_s=0)
    assert message.startswith(f"checkpoint dir error: {shared} is not shared between the nodes: rank 0 on host-a")
    assert "node 1 (host-b: ranks 2-3)" in message and "same path" in message
    assert "\n" not in message
    assert nodes.shared_dir_verdict(shared, "n0nce", rep[:2], grace_s=0) is None


def test_a_probe_from_an_earlier_start_does_not_count(tmp_path):
    nodes.write_probe(tmp_path, "old", 1)
    nodes.write_probe(tmp_path, "new", 0)
    assert nodes.unseen_ranks(tmp_path, "new", 2, grace_s=0) == [1]


def test_a_node_that_cannot_write_the_dir_is_named(tmp_path):
    rep = reports(("host-a", 0), ("host-b", 1))
    rep[1]["error"] = "Permission denied"
    message = nodes.shared_dir_verdict(tmp_path, "x", rep, grace_s=0)
    assert "node 1 (host-b: rank 1) cannot write into" in message and "Permission denied" in message


def test_stale_probes_are_removed_fresh_ones_kept(tmp_path):
    nodes.write_probe(tmp_path, "old", 3)
    nodes.write_probe(tmp_path, "other", 1)
    stale = nodes.probe_path(tmp_path, "old", 3)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    nodes.remove_stale_probes(tmp_path, "mine")
    assert not stale.exists() and nodes.probe_path(tmp_path, "other", 1).exists()


# --------------------------------------------------------------------- SLURM template, on fake SLURM tools

SBATCH = harness.ROOT / "launch" / "slurm.sbatch"


def fake_slurm(tmp_path: Path, nodelist: str, **env_extra) -> tuple[dict, Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    for tool in ("srun", "scontrol", "scancel", "ds-finetune"):
        wrapper = bin_dir / tool
        fake = harness.ROOT / "tests" / "scripts" / "fake_slurm.py"
        wrapper.write_text(f'#!/bin/sh\nexec "{harness.PY}" "{fake}" {tool} "$@"\n')
        wrapper.chmod(0o755)
    env = harness.child_env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state),
                             "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodelist, "GPUS_PER_NODE": "2",
                             "CONFIG": str(harness.TINY), "DS_FINETUNE": str(bin_dir / "ds-finetune"),
                             "REAL_DS_FINETUNE": CLI, **env_extra})
    return env, state


def slurm_calls(state: Path) -> list[list[str]]:
    import json
    return [json.loads(line) for line in (state / "calls").read_text().splitlines()]


@pytest.mark.multiproc  # the killed run it resumes from is a real launch (saved_at_step4)
def test_sbatch_template_starts_every_node_with_resume_and_requeues_after_sigterm(tmp_path, saved_at_step4):
    """`#SBATCH --signal=B:TERM@120` signals the batch script only: it must pass SIGTERM to every node's task,
    wait for them to save and exit, then requeue the job; each node runs `ds-finetune train --resume
    --no-ssh --node-rank $SLURM_NODEID --master-addr <first node>`, and the real CLI accepts that command and
    would continue from the run's newest checkpoint (step 4 of a killed run), not start again."""
    import json
    env, state = fake_slurm(tmp_path, "gpu-a,gpu-b")
    out = harness.copy_run(saved_at_step4(2), tmp_path / "out")
    script = subprocess.Popen(["bash", str(SBATCH), "train.lr=2e-5", f"output_dir={out}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert harness.wait_for(lambda: all((state / f"task{i}.json").exists() for i in (0, 1)), timeout=120)
    script.send_signal(signal.SIGTERM)
    output = script.communicate(timeout=60)[0]
    assert script.returncode == 128 + signal.SIGTERM, output
    assert all((state / f"task{i}.terminated").exists() for i in (0, 1)), output
    calls = slurm_calls(state)
    assert ["scancel", "--signal=TERM", "4242"] in calls and calls[-1] == ["scontrol", "requeue", "4242"], calls
    assert "requeueing job 4242" in output

    hostfile = tmp_path / ".ds-finetune-hosts-4242"
    assert not hostfile.exists(), "the job's hostfile is removed when the script ends"
    for i in (0, 1):
        task = json.loads((state / f"task{i}.json").read_text())
        assert task["argv"] == ["train", str(harness.TINY), "--hostfile", str(hostfile), "--no-ssh", "--node-rank",
                                str(i), "--master-addr", "gpu-a", "--master-port", str(29500 + 4242 % 1000),
                                "--resume", "train.lr=2e-5", f"output_dir={out}"]
        assert task["hostfile"] == "gpu-a slots=2\ngpu-b slots=2\n"
        assert task["dry_run_code"] == 0, task
        assert f"--no_ssh --node_rank={i} --master_addr gpu-a --master_port 29742" in task["dry_run_first_line"]
        harness.assert_resumed_in_dry_run(task["dry_run_resume_line"], out / "checkpoints", step=4)


def test_sbatch_template_does_not_requeue_a_job_that_ended_by_itself(tmp_path):
    for code in (0, 2):
        env, state = fake_slurm(tmp_path / str(code), "gpu-a", FAKE_TASK_EXIT=str(code))
        proc = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path / str(code), env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert not [c for c in slurm_calls(state) if c[0] in ("scancel", "scontrol") and c[1] != "show"]
