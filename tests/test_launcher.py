"""`ds-finetune train` builds the `deepspeed` launcher argv; a bad hostfile is one line naming
file and line; the launcher builds argv lists and no config or hostfile value ever reaches a shell."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_finetune.cli import main
from ds_finetune.errors import UserError
from ds_finetune.launcher import (LaunchSpec, build_launch_argv, deepspeed_executable, has_accelerator,
                                  launch_env, parse_hostfile, run_launcher, training_script, world_size_of)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
DS = deepspeed_executable()
SCRIPT = training_script()


def dry_run(*args: str, env=None) -> tuple[list[str], str]:
    """(launcher argv as printed, the `# world_size=...` line) of `ds-finetune train TINY --dry-run ARGS`."""
    result = CliRunner().invoke(main, ["train", TINY, "--dry-run", *args], env=env or {"DS_ACCELERATOR": "cpu"})
    assert result.exit_code == 0, result.stderr
    first, layout = result.stdout.splitlines()[:2]
    words = shlex.split(first)
    # Without an accelerator a single-node command says it runs on the CPU; a hostfile run leaves the
    # choice to each node (cli.py), so the launching node's environment is passed as it is.
    if "--hostfile" in args:
        assert words[0] != "DS_ACCELERATOR=cpu"
        return words, layout
    assert words[0] == "DS_ACCELERATOR=cpu", "with no accelerator the printed command says so"
    return words[1:], layout


def expected(*launcher_flags: str, tail: tuple[str, ...] = ()) -> list[str]:
    return [*DS, *launcher_flags, *SCRIPT, "--config", TINY, *tail]


@pytest.fixture
def hostfile(tmp_path):
    def make(text: str, name: str = "hostfile") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    return make


def cli_error(*args: str, names=()) -> str:
    result = CliRunner().invoke(main, ["train", TINY, "--dry-run", *args], env={"DS_ACCELERATOR": "cpu"})
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    line = result.stderr.rstrip("\n")
    assert line.splitlines() == [line] and line.startswith("error: "), result.stderr
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------------ the argv

def test_single_node_default_runs_one_cpu_process():
    argv, layout = dry_run()
    assert argv == expected("--num_gpus", "1")
    assert layout == "# world_size=1 micro_batch_size=4 grad_accum=2 global_batch=8"


def test_num_gpus_sets_processes_and_the_global_batch():
    argv, layout = dry_run("--num-gpus", "2")
    assert argv == expected("--num_gpus", "2")
    assert layout == "# world_size=2 micro_batch_size=4 grad_accum=2 global_batch=16"


def test_hostfile_is_passed_and_sets_the_world_size(hostfile):
    path = hostfile("host1 slots=2\nhost2 slots=2\n")
    argv, layout = dry_run("--hostfile", path)
    assert argv == expected("--hostfile", path)
    assert layout.startswith("# world_size=4 ")


def test_hostfile_with_include_selects_slots(hostfile):
    path = hostfile("host1 slots=2\nhost2 slots=2\n")
    argv, layout = dry_run("--hostfile", path, "--include", "host1:0@host2")
    assert argv == expected("--hostfile", path, "--include", "host1:0@host2")
    assert layout.startswith("# world_size=3 ")


def test_hostfile_with_exclude_and_num_nodes(hostfile):
    path = hostfile("host1 slots=2\nhost2 slots=2\nhost3 slots=2\n")
    argv, layout = dry_run("--hostfile", path, "--exclude", "host2:1")
    assert argv == expected("--hostfile", path, "--exclude", "host2:1")
    assert layout.startswith("# world_size=5 ")
    argv, layout = dry_run("--hostfile", path, "--num-nodes", "2", "--num-gpus", "1")
    assert argv == expected("--hostfile", path, "--num_nodes", "2", "--num_gpus", "1")
    assert layout.startswith("# world_size=2 ")


def test_master_port_and_addr_are_passed():
    argv, _ = dry_run("--master-port", "29600")
    assert argv == expected("--num_gpus", "1", "--master_port", "29600")
    argv, _ = dry_run("--master-addr", "10.0.0.1", "--master-port", "29600")
    assert argv == expected("--num_gpus", "1", "--master_addr", "10.0.0.1", "--master_port", "29600")


def test_resume_without_path_means_newest_complete():
    argv, _ = dry_run("--resume")
    assert argv == expected("--num_gpus", "1", tail=("--resume",))


def test_resume_with_path_passes_that_path():
    argv, _ = dry_run("--resume", "runs/tiny/checkpoints/step_10")
    assert argv == expected("--num_gpus", "1", tail=("--resume", "runs/tiny/checkpoints/step_10"))


def test_resume_followed_by_an_override_is_the_flag_plus_the_override():
    argv, _ = dry_run("--resume", "train.max_steps=80")
    assert argv == expected("--num_gpus", "1", tail=("--resume", "train.max_steps=80"))


def test_overrides_are_passed_through_in_order():
    argv, layout = dry_run("train.zero_stage=3", "train.micro_batch_size=2", "--overwrite")
    assert argv == expected("--num_gpus", "1", tail=("--overwrite", "train.zero_stage=3", "train.micro_batch_size=2"))
    assert layout == "# world_size=1 micro_batch_size=2 grad_accum=2 global_batch=4"


def test_build_launch_argv_returns_a_list_of_strings():
    spec = LaunchSpec(config_path=TINY, overrides=["train.lr=1e-3"], resume="auto", num_gpus=2, master_port=29600,
                      allow_config_change=True)
    argv = build_launch_argv(spec, on_accelerator=False)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv == expected("--num_gpus", "2", "--master_port", "29600",
                            tail=("--resume", "--allow-config-change", "train.lr=1e-3"))


def test_on_an_accelerator_all_local_devices_are_used_by_default():
    argv = build_launch_argv(LaunchSpec(config_path=TINY), on_accelerator=True)
    assert argv == expected()


def test_without_an_accelerator_the_env_selects_the_cpu_accelerator(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert launch_env(on_accelerator=False)["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in launch_env(on_accelerator=True)


def test_ds_accelerator_env_decides_the_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert has_accelerator() is False
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert has_accelerator() is True


def test_dry_run_on_this_machine_prints_the_cpu_prefix_iff_no_gpu():
    import torch

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    p = subprocess.run([sys.executable, "-m", "ds_finetune.cli", "train", TINY, "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("DS_ACCELERATOR=cpu ") == (not torch.cuda.is_available())


# ------------------------------------------------------------------------------ flag combinations

def test_include_without_hostfile_is_an_error_not_ignored():
    cli_error("--include", "localhost:1", names=["--include", "--hostfile"])


def test_include_with_num_gpus_is_refused_before_deepspeed_does(hostfile):
    path = hostfile("host1 slots=2\nhost2 slots=2\n")
    cli_error("--hostfile", path, "--include", "host1", "--num-gpus", "1", names=["--include", "--num-gpus"])


def test_num_gpus_beyond_a_hosts_slots_is_an_error(hostfile):
    path = hostfile("host1 slots=4\nhost2 slots=2\n")
    cli_error("--hostfile", path, "--num-gpus", "3", names=["--num-gpus 3", "'host2'", path])


def test_num_nodes_without_hostfile_is_an_error():
    cli_error("--num-nodes", "2", names=["--num-nodes 2", "--hostfile"])


def test_include_of_an_unknown_host_is_an_error(hostfile):
    path = hostfile("host1 slots=2\n")
    cli_error("--hostfile", path, "--include", "host9", names=["host9", "host1"])


def test_global_batch_that_the_hostfile_world_cannot_split_is_an_error(hostfile):
    path = hostfile("host1 slots=3\n")
    line = cli_error("--hostfile", path, "train.global_batch_size=16",
                     names=["train.global_batch_size 16", "4×3", "use a world size in [1, 2, 4]"])
    assert "[]" not in line, "no micro batch size fits 16 over 3 ranks: none is offered"


# ------------------------------------------------------------------------------------------ hostfile

def test_hostfile_comments_and_blank_lines_are_fine(hostfile):
    path = hostfile("# cluster A\n\nworker-1 slots=8   # first\n   \n\tworker-0 slots=4\n# end\n")
    assert list(parse_hostfile(path).items()) == [("worker-1", 8), ("worker-0", 4)]


@pytest.mark.parametrize("text, line, what", [
    ("host1 slots=2\n\nhost2 slot=2\n", 3, "is not `hostname slots=N`"),
    ("host1 slots=2\nhost2\n", 2, "is not `hostname slots=N`"),
    ("host1 slots=two\n", 1, "is not `hostname slots=N`"),
    ("host1 slots=-1\n", 1, "is not `hostname slots=N`"),
    ("# c\nhost1 slots=2\nhost1 slots=2\n", 3, "listed twice"),
    ("host1 slots=2\n# c\nhost2 slots=0\n", 3, "slots must be >= 1"),
])
def test_bad_hostfile_line_is_one_line_naming_file_and_line(hostfile, text, line, what):
    path = hostfile(text)
    with pytest.raises(UserError) as e:
        parse_hostfile(path)
    assert f"{path}:{line}:" in e.value.message and what in e.value.message
    cli_error("--hostfile", path, names=[f"{path}:{line}:", what])


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n  # more\n"])
def test_empty_hostfile_is_an_error(hostfile, text):
    path = hostfile(text)
    cli_error("--hostfile", path, names=[path, "lists no hosts"])


def test_missing_hostfile_is_an_error(tmp_path):
    path = str(tmp_path / "nope")
    cli_error("--hostfile", path, names=[path, "no such file"])


def test_bad_hostfile_in_a_real_process_has_no_traceback(hostfile):
    path = hostfile("host1 slots=2\nhost2 slots=0\n")
    p = subprocess.run([sys.executable, "-m", "ds_finetune.cli", "train", TINY, "--dry-run", "--hostfile", path],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 2 and p.stdout == ""
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: hostfile error: {path}:2: slots must be >= 1 (got 0)"


def test_world_size_of_a_hostfile_counts_active_slots(hostfile):
    path = hostfile("a slots=2\nb slots=3\nc slots=1\n")
    assert world_size_of(LaunchSpec(TINY, hostfile=path), on_accelerator=True) == 6
    assert world_size_of(LaunchSpec(TINY, hostfile=path, include="a@c:0"), on_accelerator=True) == 3
    assert world_size_of(LaunchSpec(TINY, hostfile=path, exclude="b:0,1"), on_accelerator=True) == 4
    assert world_size_of(LaunchSpec(TINY, hostfile=path, num_nodes=2), on_accelerator=True) == 5
    assert world_size_of(LaunchSpec(TINY, hostfile=path, num_gpus=1), on_accelerator=True) == 3


# ----------------------------------------------------------------------------------- no shell, ever

def test_override_with_shell_metacharacters_is_one_argv_element_and_not_run(tmp_path):
    pwned = tmp_path / "pwned"
    override = f"output_dir=$(touch {pwned}); `touch {pwned}` && echo x > {pwned} | cat"
    result = CliRunner().invoke(main, ["train", TINY, "--dry-run", override], env={"DS_ACCELERATOR": "cpu"})
    assert result.exit_code == 0, result.stderr
    argv = shlex.split(result.stdout.splitlines()[0])[1:]
    assert argv[-1] == override and argv == expected("--num_gpus", "1", tail=(override,))
    assert f"output_dir: $(touch {pwned})" in result.stdout
    assert not pwned.exists()


def test_hostfile_path_with_spaces_is_one_argv_element(hostfile):
    path = hostfile("host1 slots=1\n", name="my hosts/the hostfile; rm -rf x")
    argv, layout = dry_run("--hostfile", path)
    assert argv == expected("--hostfile", path)
    assert layout.startswith("# world_size=1 ")


def test_multi_node_launch_refuses_values_its_remote_shell_would_interpret(hostfile, tmp_path):
    """DeepSpeed's pdsh runner joins the remote command into a shell line; refuse rather than run it."""
    path = hostfile("host1 slots=1\nhost2 slots=1\n")
    cli_error("--hostfile", path, f"output_dir=$(touch {tmp_path}/pwned)",
              names=["override", "$(touch", "remote shell"])
    cli_error("--hostfile", path, "--resume", "runs/my run/step_1", names=["--resume", "'runs/my run/step_1'"])
    argv, _ = dry_run("--hostfile", path, "output_dir=runs/ok-1", "train.lr=2e-5")
    assert argv[-2:] == ["output_dir=runs/ok-1", "train.lr=2e-5"]


def test_run_launcher_execs_the_argv_without_a_shell(tmp_path):
    out, pwned = tmp_path / "argv.json", tmp_path / "pwned"
    hostile = [f"$(touch {pwned})", f"a b; touch {pwned}", f"`touch {pwned}`", "'\"", "*"]
    code = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    rc = run_launcher([sys.executable, "-c", code, str(out), *hostile], env=launch_env(on_accelerator=False))
    assert rc == 0
    assert json.loads(out.read_text()) == hostile
    assert not pwned.exists()


def test_run_launcher_returns_the_launchers_exit_code():
    assert run_launcher([sys.executable, "-c", "raise SystemExit(3)"], env=dict(os.environ)) == 3


# ------------------------------------------------------------------------------ multi-node flags

def dry_run_lines(*args: str) -> list[str]:
    result = CliRunner().invoke(main, ["train", TINY, "--dry-run", *args], env={"DS_ACCELERATOR": "cpu"})
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


def test_no_ssh_dry_run_prints_one_command_per_node_with_its_node_rank(hostfile):
    path = hostfile("node-a slots=2\nnode-b slots=2\n")
    lines = dry_run_lines("--hostfile", path, "--no-ssh", "--master-addr", "10.0.0.1", "--master-port", "29600")
    flags = ("--hostfile", path, "--no_ssh")
    per_node = [expected(*flags, f"--node_rank={i}", "--master_addr", "10.0.0.1", "--master_port", "29600")
                for i in (0, 1)]
    # The command runs on the node it is typed on: with no accelerator there, the CPU is named.
    assert shlex.split(lines[0]) == ["DS_ACCELERATOR=cpu", *per_node[0]]
    assert lines[1] == "# world_size=4 micro_batch_size=4 grad_accum=2 global_batch=32"
    assert "10.0.0.1:29600" in lines[2]
    assert lines[3].startswith("# node 0 (node-a): ") and lines[4].startswith("# node 1 (node-b): ")
    assert shlex.split(lines[3].split(": ", 1)[1]) == ["DS_ACCELERATOR=cpu", *per_node[0]]
    assert shlex.split(lines[4].split(": ", 1)[1]) == ["DS_ACCELERATOR=cpu", *per_node[1]]
    assert lines[5] == "# resolved run config"


def test_no_ssh_with_node_rank_runs_that_nodes_command(hostfile):
    path = hostfile("node-a slots=1\nnode-b slots=1\nnode-c slots=1\n")
    lines = dry_run_lines("--hostfile", path, "--exclude", "node-a", "--no-ssh", "--node-rank", "1",
                          "--master-addr", "node-b", "--resume", "train.lr=2e-5")
    assert shlex.split(lines[0])[1:] == expected("--hostfile", path, "--exclude", "node-a", "--no_ssh",
                                                 "--node_rank=1", "--master_addr", "node-b",
                                                 tail=("--resume", "train.lr=2e-5"))
    assert lines[1].startswith("# world_size=2 ")
    assert [line.split(":")[0] for line in lines if line.startswith("# node ")] == ["# node 0 (node-b)",
                                                                                   "# node 1 (node-c)"]


def test_node_rank_is_range_checked_against_the_active_hosts(hostfile):
    path = hostfile("node-a slots=1\nnode-b slots=1\nnode-c slots=1\n")
    cli_error("--hostfile", path, "--no-ssh", "--master-addr", "a", "--node-rank", "3",
              names=["--node-rank 3", path, "3 active nodes (node-a, node-b, node-c)", "0..2"])
    cli_error("--hostfile", path, "--include", "node-a@node-c", "--no-ssh", "--master-addr", "a", "--node-rank", "2",
              names=["--node-rank 2", "2 active nodes (node-a, node-c)", "0..1"])


@pytest.mark.parametrize("args, names", [
    (["--node-rank", "0"], ["--node-rank", "--no-ssh"]),
    (["--no-ssh", "--node-rank", "0", "--master-addr", "a"], ["--no-ssh", "--hostfile"]),
    (["HOSTFILE", "--node-rank", "1", "--master-addr", "a"], ["--node-rank", "--no-ssh"]),
    (["HOSTFILE", "--no-ssh", "--node-rank", "1"], ["--no-ssh", "--master-addr", "node 0 (node-a)"]),
    (["HOSTFILE", "--no-ssh", "--master-addr", "a", "--launcher", "pdsh"], ["--launcher", "--no-ssh"]),
    (["--launcher", "pdsh"], ["--launcher pdsh", "--hostfile"]),
])
def test_multi_node_flag_combinations_deepspeed_would_reject_or_ignore_are_errors(hostfile, args, names):
    path = hostfile("node-a slots=1\nnode-b slots=1\n")
    cli_error(*[x for a in args for x in (["--hostfile", path] if a == "HOSTFILE" else [a])], names=names)


def test_a_filter_that_leaves_no_host_is_an_error(hostfile):
    path = hostfile("node-a slots=1\n")
    cli_error("--hostfile", path, "--exclude", "node-a", "--no-ssh", names=["leave no host", path])


def test_no_ssh_without_node_rank_cannot_run(hostfile):
    path = hostfile("node-a slots=1\nnode-b slots=1\n")
    spec = LaunchSpec(TINY, hostfile=path, no_ssh=True, master_addr="10.0.0.1")
    with pytest.raises(UserError) as e:
        build_launch_argv(spec, on_accelerator=False)
    assert "--node-rank R" in e.value.message and "R = 0..1" in e.value.message


@pytest.mark.parametrize("launcher", ["pdsh", "mpich", "impi"])
def test_launchers_that_set_the_rank_environment_are_passed(hostfile, launcher):
    path = hostfile("node-a slots=2\nnode-b slots=2\n")
    lines = dry_run_lines("--hostfile", path, "--launcher", launcher.upper(), "--master-addr", "node-a")
    assert shlex.split(lines[0]) == expected("--hostfile", path, "--launcher", launcher, "--master_addr", "node-a")
    assert lines[2].startswith(f"# run once, here: {launcher} starts the ranks on node-a, node-b")


@pytest.mark.parametrize("launcher", ["openmpi", "mvapich", "slurm"])
def test_launchers_that_start_ranks_without_rank_variables_are_passed(hostfile, launcher):
    """The training process reads their own rank variables (tests/test_dist.py, and a 2-process run)."""
    path = hostfile("node-a slots=2\nnode-b slots=2\n")
    lines = dry_run_lines("--hostfile", path, "--launcher", launcher, "--master-addr", "node-a")
    assert shlex.split(lines[0]) == expected("--hostfile", path, "--launcher", launcher, "--master_addr", "node-a")


def test_no_ssh_values_never_pass_a_remote_shell_so_spaces_are_fine(hostfile):
    path = hostfile("node-a slots=1\nnode-b slots=1\n")
    lines = dry_run_lines("--hostfile", path, "--no-ssh", "--node-rank", "0", "--master-addr", "a",
                          "output_dir=runs/my run")
    assert shlex.split(lines[0])[-1] == "output_dir=runs/my run"


def test_a_pdsh_launch_without_pdsh_is_one_line_before_anything_starts(hostfile, monkeypatch):
    import ds_finetune.launcher as launcher_module
    path = hostfile("node-a slots=1\nnode-b slots=1\n")
    monkeypatch.setattr(launcher_module.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as e:
        launcher_module.check_launch_tools(LaunchSpec(TINY, hostfile=path))
    assert "pdsh is not installed" in e.value.message and "--no-ssh --node-rank R" in e.value.message
    launcher_module.check_launch_tools(LaunchSpec(TINY, hostfile=path, no_ssh=True, node_rank=0, master_addr="a"))
    launcher_module.check_launch_tools(LaunchSpec(TINY, hostfile=hostfile("solo slots=2\n", name="one")))


def test_discard_newer_reaches_the_training_process():
    argv, _ = dry_run("--resume", "runs/tiny/checkpoints/step_10", "--discard-newer")
    assert argv == expected("--num_gpus", "1", tail=("--resume", "runs/tiny/checkpoints/step_10", "--discard-newer"))


class FakeProcess:
    def __init__(self, *cmdline):
        self._cmdline = list(cmdline)

    def cmdline(self):
        return self._cmdline


def test_sigterm_goes_to_the_ranks_not_to_deepspeeds_launch_py():
    """launch.py answers a SIGTERM by SIGKILLing the ranks 30 s later, mid-save; it has the script among its
    arguments too, so a rank is told apart by what the interpreter runs."""
    from ds_finetune.launcher import is_training_process
    assert is_training_process(FakeProcess("python", "-u", "/repo/launch/train.py", "--config", "x.yaml"))
    assert is_training_process(FakeProcess("python", "-m", "ds_finetune.train", "--config", "x.yaml"))
    assert not is_training_process(FakeProcess("python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30",
                                               "/repo/launch/train.py", "--config", "x.yaml"))
    assert not is_training_process(FakeProcess("python", "/venv/bin/deepspeed", "--num_gpus", "2",
                                               "/repo/launch/train.py"))
