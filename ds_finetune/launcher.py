"""Run config + CLI flags -> the `deepspeed` launcher argv, and hostfile validation.

The argv is always a list handed to exec; no config or hostfile value ever reaches a shell.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ds_finetune.errors import UserError

# DeepSpeed's runner accepts exactly this shape (deepspeed/launcher/runner.py `fetch_hostfile`).
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """host -> slots, in file order. A bad line, a duplicate host or slots <= 0 is a one-line error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"hostfile error: {path}: no such file; write one line per node: `hostname slots=N`")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"hostfile error: {path}: cannot read it ({e})")
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOSTFILE_LINE.match(line)
        if not m:
            raise UserError(f"hostfile error: {path}:{number}: {line!r} is not `hostname slots=N`")
        host, slots = m.group(1), int(m.group(2))
        if slots <= 0:
            raise UserError(f"hostfile error: {path}:{number}: slots must be >= 1 (got {slots})")
        if host in hosts:
            raise UserError(f"hostfile error: {path}:{number}: host {host!r} is listed twice; merge its slots into one line")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"hostfile error: {path} lists no hosts; write one line per node: `hostname slots=N`")
    return hosts


def _parse_host_filter(text: str, hosts: dict[str, int], flag: str) -> dict[str, set[int]]:
    """DeepSpeed's `host1:0,1@host2` syntax -> host -> slot indices."""
    chosen: dict[str, set[int]] = {}
    for part in text.split("@"):
        host, _, slots = part.partition(":")
        if host not in hosts:
            raise UserError(f"{flag} names host {host!r}, which is not in the hostfile ({', '.join(hosts)})")
        try:
            idx = {int(s) for s in slots.split(",")} if slots else set(range(hosts[host]))
        except ValueError:
            raise UserError(f"{flag} {text!r}: slots must be integers, as in host1:0,1@host2")
        if any(i < 0 or i >= hosts[host] for i in idx):
            raise UserError(f"{flag} {text!r}: host {host} has slots 0..{hosts[host] - 1}")
        chosen[host] = idx
    return chosen


def active_slots(hosts: dict[str, int], include: str | None, exclude: str | None) -> dict[str, set[int]]:
    if include and exclude:
        raise UserError("use --include or --exclude, not both")
    all_slots = {h: set(range(n)) for h, n in hosts.items()}
    if include:
        return _parse_host_filter(include, hosts, "--include")
    if exclude:
        drop = _parse_host_filter(exclude, hosts, "--exclude")
        return {h: s - drop.get(h, set()) for h, s in all_slots.items() if s - drop.get(h, set())}
    return all_slots


@dataclass
class LaunchSpec:
    config_path: str
    overrides: list[str] = field(default_factory=list)
    resume: str | None = None           # None: fresh; "auto": newest complete; else a path
    overwrite: bool = False
    allow_config_change: bool = False
    discard_newer: bool = False
    num_gpus: int | None = None
    num_nodes: int | None = None
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str | None = None          # DeepSpeed's multi-node backend (default pdsh)
    no_ssh: bool = False                 # every node is started by hand (or srun) with its node_rank
    node_rank: int | None = None


def has_accelerator() -> bool:
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"] != "cpu"
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken torch install is reported by the training process itself
        return False


def processes_per_host(spec: LaunchSpec) -> dict[str, int]:
    """host -> ranks it will run, as DeepSpeed's runner (0.19 `main`, `apply_num_nodes_and_gpus`) decides
    from the hostfile and flags; combinations the runner would reject or silently ignore are UserErrors."""
    if (spec.include or spec.exclude) and not spec.hostfile:
        raise UserError("--include/--exclude pick hosts and slots from --hostfile; on one node use --num-gpus")
    if (spec.include or spec.exclude) and (spec.num_gpus or spec.num_nodes):
        raise UserError("--include/--exclude cannot be combined with --num-gpus/--num-nodes (DeepSpeed refuses "
                        "it); use one or the other")
    if not spec.hostfile:
        if spec.num_nodes and spec.num_nodes > 1:
            raise UserError(f"--num-nodes {spec.num_nodes} needs --hostfile listing the nodes")
        return {}
    hosts = parse_hostfile(spec.hostfile)
    per_host = {h: len(s) for h, s in active_slots(hosts, spec.include, spec.exclude).items()}
    if spec.num_nodes:
        per_host = dict(list(per_host.items())[:spec.num_nodes])
    if spec.num_gpus:
        # DeepSpeed starts exactly num_gpus ranks on every host, even beyond its slots.
        too_small = [h for h, n in per_host.items() if n < spec.num_gpus]
        if too_small:
            raise UserError(f"--num-gpus {spec.num_gpus} is more than the {per_host[too_small[0]]} slots of host "
                            f"{too_small[0]!r} in {spec.hostfile}")
        per_host = {h: spec.num_gpus for h in per_host}
    return per_host


def world_size_of(spec: LaunchSpec, on_accelerator: bool) -> int:
    if spec.hostfile:
        return sum(processes_per_host(spec).values())
    processes_per_host(spec)  # flag combinations without a hostfile
    if spec.num_gpus:
        return spec.num_gpus
    if on_accelerator:
        import torch
        return max(1, torch.cuda.device_count())
    return 1


def deepspeed_executable() -> list[str]:
    # Prefer the `deepspeed` script of the interpreter we run under (the venv), then PATH.
    beside = Path(sys.executable).with_name("deepspeed")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def training_script() -> list[str]:
    script = REPO_ROOT / "launch" / "train.py"
    return [str(script)] if script.exists() else ["--module", "ds_finetune.train"]


# With more than one host, DeepSpeed's default runner (pdsh, deepspeed/launcher/multinode_runner.py in
# 0.19) joins the remote command into one shell line and only wraps values containing spaces in double
# quotes, so `$(...)` in an override would run on every node. What reaches that line must be shell-inert.
_SHELL_INERT = re.compile(r"[A-Za-z0-9_./=:,@+-]*")


def _refuse_remote_shell_metacharacters(spec: LaunchSpec) -> None:
    remote = [("the config path", str(spec.config_path)), ("--master-addr", spec.master_addr or "")]
    remote += [("--resume", spec.resume)] if spec.resume not in (None, "auto") else []
    remote += [("override", o) for o in spec.overrides]
    for what, value in remote:
        if not _SHELL_INERT.fullmatch(value):
            raise UserError(f"{what} {value!r}: a multi-node launch passes it through a remote shell (pdsh); "
                            f"use only letters, digits and ._-/=:,@+ here and put other values in the YAML config")


# DeepSpeed 0.19 backends (runner.py LAUNCHER_CLASSES). pdsh runs `deepspeed.launcher.launch` on each
# node, which sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR; mpich and impi set them too; openmpi,
# mvapich and slurm start the script bare, and the training process reads their own variables
# (OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*, SLURM_PROCID/NTASKS/LOCALID: dist.rank_environment).
LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


def check_multinode_flags(spec: LaunchSpec, per_host: dict[str, int], need_node_rank: bool = True) -> None:
    """--launcher / --no-ssh / --node-rank combinations DeepSpeed would reject, ignore, or run wrongly."""
    hosts = list(per_host)
    if spec.hostfile and not hosts:
        raise UserError(f"--include/--exclude leave no host of {spec.hostfile} to run on")
    if spec.launcher is not None:
        if spec.no_ssh:
            raise UserError("--launcher and --no-ssh exclude each other: with --no-ssh you start every node "
                            "yourself (one command per node, see --dry-run)")
        if not spec.hostfile:
            raise UserError(f"--launcher {spec.launcher} starts the ranks on the nodes of --hostfile; pass one "
                            f"(on one node leave --launcher out)")
        if spec.launcher not in LAUNCHERS:
            raise UserError(f"--launcher {spec.launcher!r} is not one of DeepSpeed's: {', '.join(LAUNCHERS)}")
    if spec.node_rank is not None and not spec.no_ssh:
        raise UserError("--node-rank needs --no-ssh (with ssh/pdsh DeepSpeed numbers the nodes itself)")
    if not spec.no_ssh:
        return
    if not spec.hostfile:
        raise UserError("--no-ssh needs --hostfile listing every node (it fixes the world size and which ranks "
                        "each node runs)")
    if not spec.master_addr:
        raise UserError(f"--no-ssh needs --master-addr: the address of node 0 ({hosts[0]}) that every node can reach")
    if spec.node_rank is None:
        if need_node_rank:
            raise UserError(f"--no-ssh needs --node-rank R: run this command on each of the {len(hosts)} nodes "
                            f"with R = 0..{len(hosts) - 1} in hostfile order (see --dry-run)")
    elif not 0 <= spec.node_rank < len(hosts):
        raise UserError(f"--node-rank {spec.node_rank} is out of range: {spec.hostfile} has {len(hosts)} active "
                        f"node{'s' if len(hosts) != 1 else ''} ({', '.join(hosts)}); use 0..{len(hosts) - 1}")


def build_launch_argv(spec: LaunchSpec, on_accelerator: bool) -> list[str]:
    argv = deepspeed_executable()
    per_host = processes_per_host(spec)  # fail on a bad hostfile or flag combination before DeepSpeed does
    check_multinode_flags(spec, per_host)
    if len(per_host) > 1 and not spec.no_ssh:
        _refuse_remote_shell_metacharacters(spec)
    if spec.hostfile:
        argv += ["--hostfile", str(spec.hostfile)]
        if spec.include:
            argv += ["--include", spec.include]
        if spec.exclude:
            argv += ["--exclude", spec.exclude]
        if spec.num_nodes:
            argv += ["--num_nodes", str(spec.num_nodes)]
    if spec.num_gpus is not None:
        argv += ["--num_gpus", str(spec.num_gpus)]
    elif not on_accelerator and not spec.hostfile:
        argv += ["--num_gpus", "1"]
    if spec.launcher is not None:
        argv += ["--launcher", spec.launcher]
    if spec.no_ssh:
        argv += ["--no_ssh", f"--node_rank={spec.node_rank}"]
    if spec.master_addr:
        argv += ["--master_addr", spec.master_addr]
    if spec.master_port is not None:
        argv += ["--master_port", str(spec.master_port)]
    argv += training_script() + ["--config", str(spec.config_path)]
    if spec.resume is not None:
        argv += ["--resume"] if spec.resume == "auto" else ["--resume", spec.resume]
    if spec.overwrite:
        argv.append("--overwrite")
    if spec.allow_config_change:
        argv.append("--allow-config-change")
    if spec.discard_newer:
        argv.append("--discard-newer")
    return argv + list(spec.overrides)


def per_node_launch_argvs(spec: LaunchSpec, on_accelerator: bool) -> list[tuple[str, list[str]]]:
    """(host, argv) for every node of a --no-ssh run, in node-rank order: what each node must run."""
    per_host = processes_per_host(spec)
    check_multinode_flags(spec, per_host, need_node_rank=False)
    return [(host, build_launch_argv(replace(spec, node_rank=i), on_accelerator)) for i, host in enumerate(per_host)]


def check_launch_tools(spec: LaunchSpec) -> None:
    """Before a real launch: DeepSpeed reports a missing pdsh with a traceback after its own ssh check."""
    if not spec.hostfile or spec.no_ssh or (spec.launcher or "pdsh") != "pdsh":
        return
    hosts = processes_per_host(spec)
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        raise UserError(f"launching on {len(hosts)} nodes ({', '.join(hosts)}) goes through pdsh over ssh, and pdsh "
                        f"is not installed here; install it (e.g. `apt install pdsh`) and set up passwordless ssh, or "
                        f"start each node yourself with --no-ssh --node-rank R --master-addr ADDR")


def launch_env(on_accelerator: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not on_accelerator:
        env["DS_ACCELERATOR"] = "cpu"  # same code path, CPU accelerator + gloo
    return env


def is_training_process(p) -> bool:
    """A rank: python running launch/train.py (or -m ds_finetune.train) itself, not a launcher that merely
    has the script among its arguments."""
    try:
        args = iter(p.cmdline()[1:])
    except Exception:  # psutil.Error: it exited or is not ours to read
        return False
    for arg in args:
        if arg == "-m":
            return next(args, "") == "ds_finetune.train"
        if not arg.startswith("-"):
            return arg.endswith(f"launch{os.sep}train.py")
    return False


def run_launcher(argv: list[str], env: dict[str, str]) -> int:
    """Run the deepspeed launcher and wait for every process it started.

    DeepSpeed 0.19's single-node runner installs no signal handler: a SIGTERM kills the runner alone and
    leaves the ranks running unaware. So on SIGTERM (a scheduler) we send SIGTERM to the training processes
    themselves; they finish their step, save and exit. Not to DeepSpeed's `launch.py`: it would answer by
    SIGKILLing every rank 30 s later, whatever the save still had to write. (Before the ranks exist, the
    signal goes to every descendant.) On SIGINT (a terminal's Ctrl-C already reached the whole foreground
    group) we only note the descendants. Either way we wait for them all, so the shell gets its prompt
    back only after the checkpoint is committed."""
    import psutil

    proc = subprocess.Popen(argv, env=env)
    me = psutil.Process(proc.pid)
    tracked: dict[int, psutil.Process] = {}
    got_signal = 0

    def on_signal(signum, frame):
        nonlocal got_signal
        got_signal = got_signal or signum
        try:
            everyone = [me] + me.children(recursive=True)
            tracked.update((p.pid, p) for p in everyone)
            ranks = [p for p in everyone if is_training_process(p)]
            if signum == signal.SIGTERM:
                for p in ranks or everyone:
                    p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    try:
        code = proc.wait()
        psutil.wait_procs(list(tracked.values()))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    return 128 + got_signal if got_signal else code
