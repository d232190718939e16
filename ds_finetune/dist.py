"""The process group, every collective the package makes, the one way ranks agree on a decision, and
each rank's RNG.

Collectives live here only (a test keeps it so): their tensors are built on `collective_device()`, the
accelerator's current device, because NCCL serves CUDA tensors only; a CPU tensor there fails with "No
backend type associated with device type cpu". The exception is a number the host needs at once
(`max_over_ranks`): it is agreed in a gloo group on CPU tensors (`host_group`), as reading an NCCL result
back would wait for the GPU. `decide` is the single pattern for "some ranks do a piece
of work, every rank learns the result or the error": a rank that failed never leaves the others waiting
in a collective forever.

RNG states are encoded as plain lists (JSON-able), the same for native checkpoints (`client_state`) and
for the stage-independent copy (`meta.json`), so one `restore_rng` reads both.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import random
import re
import socket

import numpy as np
import torch

from ds_finetune.errors import UserError


# (rank, world size, local rank, local world size) as MPI implementations and SLURM name them, for ranks
# started without torchrun's or DeepSpeed's RANK/WORLD_SIZE (mpirun, srun, DeepSpeed's openmpi, mvapich
# and slurm launchers). SLURM's local world size is SLURM_STEP_TASKS_PER_NODE, read separately.
RANK_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (hydra)
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    prefix, ranges = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist).groups()
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def rank_environment(environ) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this process: as the
    launcher set them, else from MPI's or SLURM's variables, else a world of one (`python launch/train.py`)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        found = {}
    else:
        names = next((n for n in RANK_VARIABLES if n[0] in environ and n[1] in environ), None)
        if names is None:
            found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_PORT": str(29500 + os.getpid() % 1000)}  # alone: any free-ish port
        else:
            rank, world, local_rank, local_world = (environ.get(n) if n else None for n in names)
            if local_world is None:  # SLURM: "4" or "4(x2)"
                local_world = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_NTASKS_PER_NODE", world))
                local_world = local_world.split("(")[0].split(",")[0]
            found = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local_rank or "0",
                     "LOCAL_WORLD_SIZE": local_world or world}
            nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST"))
            if "MASTER_ADDR" not in environ and nodelist:
                found["MASTER_ADDR"] = first_host(nodelist)
            elif "MASTER_ADDR" not in environ and found["LOCAL_WORLD_SIZE"] != found["WORLD_SIZE"]:
                raise UserError("ranks started by MPI on several nodes need MASTER_ADDR (node 0's address, "
                                "reachable from every node) in their environment; e.g. mpirun -x MASTER_ADDR=...")
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **found}


def intra_op_threads(env, cores: int, local_world: int) -> int:
    """Threads a CPU rank computes with: OMP_NUM_THREADS where set (torchrun sets 1 for several ranks a
    node), else the node's cores shared out among its ranks."""
    try:
        return max(1, int(env["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, cores // max(1, local_world))


def init_distributed() -> tuple[int, int, int]:
    """Join the process group the launcher set up; returns (rank, world size, local rank)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, value in rank_environment(os.environ).items():
        os.environ.setdefault(key, value)
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))  # DeepSpeed's launcher sets only LOCAL_SIZE
    # One intra-op thread pool per rank: OMP_NUM_THREADS if set, else its share of the node's cores. On the
    # CPU it is fixed so the float reduction order (the bitwise result) is the same in the reference and the
    # resumed run, and idle OpenMP workers (they spin) leave a core to a background save; on a GPU node it
    # keeps 8 ranks' optimizer-offload Adam (OpenMP, sized by torch's setting) from each taking every core.
    torch.set_num_threads(intra_op_threads(os.environ, os.cpu_count() or 1, local_world))
    from ds_finetune.ds_internals import skip_muon_import
    skip_muon_import()
    if get_accelerator().device_name() == "cpu":
        from ds_finetune.ds_internals import skip_cpu_inference_all_reduce
        skip_cpu_inference_all_reduce()
        # DeepSpeed's CPU accelerator counts its "devices" from LOCAL_SIZE, which only its own launcher sets;
        # without it every ZeRO-3 reduce-scatter runs `numactl --hardware` in a subprocess (~3 ms of a
        # CPU step each, hundreds a step). torchrun and srun ranks get the count they were started with.
        os.environ.setdefault("LOCAL_SIZE", str(local_world))
    else:
        index = device_index(int(os.environ["LOCAL_RANK"]), get_accelerator().device_count())
        # DeepSpeed takes the device from LOCAL_RANK, not from the current device: init_distributed passes
        # device_id=cuda:LOCAL_RANK to the process group, the engine and zero.Init set_device(LOCAL_RANK).
        os.environ["LOCAL_RANK"] = str(index)
        get_accelerator().set_device(index)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    import torch.distributed as dist
    if on_cuda():
        refuse_shared_devices(all_gather((socket.gethostname(), str(torch.cuda.get_device_properties(index).uuid))))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def refuse_shared_devices(devices: list[tuple[str, str]]) -> None:
    """Every rank's (host, GPU uuid): two ranks on one GPU (one GPU visible to several ranks of a node, which
    a per-task binding cannot be told apart from) would run out of memory or corrupt each other's timing."""
    for rank, device in enumerate(devices):
        if device in devices[:rank]:
            raise UserError(f"ranks {devices.index(device)} and {rank} drive the same GPU on {device[0]}: give each "
                            "rank its own device (check CUDA_VISIBLE_DEVICES and the scheduler's GPU binding)")


def device_index(local_rank: int, visible: int) -> int:
    """The accelerator this rank drives. Launchers that start one process a GPU on a node with all GPUs
    visible (deepspeed, torchrun) make it LOCAL_RANK; a scheduler that binds one GPU to each task (SLURM's
    --gpus-per-task=1) shows every task its own GPU as device 0. Anything else would put two ranks on one
    device (or leave a rank without one): refused."""
    if visible < 1:
        raise UserError("no accelerator device is visible to this process (check CUDA_VISIBLE_DEVICES and the "
                        "scheduler's GPU binding), or run on the CPU with DS_ACCELERATOR=cpu")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(f"local rank {local_rank} sees only {visible} accelerator devices: give each rank its own "
                    "device (all of the node's GPUs visible to every rank, or exactly one a task, e.g. SLURM's "
                    "--gpus-per-task=1), one rank a GPU")


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the accelerator's current device (the CPU on a CPU run)."""
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def sum_over_ranks(values: list) -> list[float]:
    """Every rank's `values` (numbers or 0-dim tensors on any device) summed elementwise in float64, as
    Python floats; one all-reduce, and the only host sync is reading its result."""
    import torch.distributed as dist

    device = collective_device()
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ranks' mean of `values` (weighted, where given), reduced where the values live (the model's
    device): one all-reduce, no host sync (TRL's gather_for_metrics, then the mean)."""
    import torch.distributed as dist
    if weights is None:
        weights = torch.ones_like(values)
    t = torch.stack([values * weights, weights])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t[0] / t[1].clamp(min=1)


def gather_rows(local: torch.Tensor, device) -> torch.Tensor:
    """Every rank's `local` rows (the same shape on every rank), stacked in rank order, on `device`; gathered
    on the collective device. A process without a process group is the only rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return local.to(device)
    here = local.to(collective_device())
    parts = [torch.empty_like(here) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, here)
    return torch.cat(parts).to(device)


def gather_in_group(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """The rows every member of `group` holds (sizes[k] on its rank k, which every member knows), joined in
    group-rank order, on every member; padded to the largest for one all_gather on `local`'s device."""
    import torch.distributed as dist
    here = local.new_zeros((max(sizes), *local.shape[1:]))
    here[:local.shape[0]] = local
    parts = [torch.empty_like(here) for _ in sizes]
    dist.all_gather(parts, here, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks (`value` itself when not distributed), agreed on the host: it is
    wanted as a Python number, and an NCCL collective's result would have to be read back from the GPU,
    which waits for every kernel queued before it (`host_group`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t[0])


_host_group: list = []  # the group host_group created, once a process


def host_group():
    """A group of every rank whose collectives take CPU tensors (gloo), for numbers the host needs: the
    default group where that is gloo (a CPU run; None, as when not distributed), else one created by the
    first call. new_group is itself a collective: every rank must make that first call at the same point of
    its program (`tiled_mlp` does, building the model)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    if not _host_group:
        _host_group.append(dist.new_group(backend="gloo"))
    return _host_group[0]


def barrier() -> None:
    import torch.distributed as dist
    dist.barrier()


def decide(fn, runs_here: bool):
    """Run `fn` on the ranks where `runs_here` (rank 0 must be one of them); every rank returns rank 0's
    result, or raises the first UserError any of them raised."""
    import torch.distributed as dist

    outcome = None
    if runs_here:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", e)
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    for o in outcomes:
        if o is not None and o[0] == "error":
            raise o[1]
    return outcomes[0][1]


def all_gather(value) -> list:
    """Every rank's `value`, in rank order (small picklable values only)."""
    import torch.distributed as dist
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ------------------------------------------------------------------------------------------------ RNG

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """This rank's python, numpy, torch (and CUDA) RNG states as plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if on_cuda():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_deterministic(enabled: bool) -> None:
    """train.deterministic on CUDA: kernels that give the same bits every time, so a resumed run repeats the
    uninterrupted one (same world size, stage and GPU kind). cuBLAS needs a fixed workspace (set before its
    first handle, i.e. before the model exists); torch then picks the deterministic backward of SDPA's
    memory-efficient and flash kernels (their default accumulates with atomics) and refuses, naming it, an
    op that has none. CPU kernels are deterministic already."""
    if not (enabled and on_cuda()):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def on_cuda() -> bool:
    """The run computes on CUDA devices (not merely: a CUDA device exists; a CPU-accelerator run on a GPU
    machine must not create CUDA contexts)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cuda"


@contextmanager
def rng_untouched():
    """Whatever the block draws, every RNG of this rank is where it was before it afterwards."""
    rng = capture_rng()
    try:
        yield
    finally:
        restore_rng(rng)


@contextmanager
def frozen_eval(module):
    """`module` in eval mode (no dropout), no graph, every RNG put back afterwards: a forward pass that leaves
    training exactly as it would have been without it (evaluation, a reference pass)."""
    training = module.training
    module.eval()
    try:
        with rng_untouched(), torch.no_grad():
            yield
    finally:
        module.train(training)


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and on_cuda():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8))
