"""What a GPU run needs that the CPU twin does not show by itself, checked in process: every collective's
tensors on the accelerator's current device (NCCL serves CUDA tensors only) but the one number agreed on the
host (a gloo group), the device a rank drives under SLURM's one-GPU-per-task binding, deterministic CUDA
kernels, the RNG of the accelerator in use."""
import os
import re
from pathlib import Path

import pytest
import torch

from ds_finetune import dist
from ds_finetune.errors import UserError

PACKAGE = Path(dist.__file__).resolve().parent
COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather\w*|"
                        r"scatter\w*|all_to_all\w*|send|recv|isend|irecv)\(")


def test_collectives_are_made_in_dist_only():
    """dist.py builds every collective's tensors on collective_device(); anywhere else a collective could
    meet a CPU tensor under NCCL ("No backend type associated with device type cpu") at step 1."""
    found = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if path.name != "dist.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if COLLECTIVE.search(line)]
    assert found == []
    assert COLLECTIVE.search("    dist.all_reduce(values)")  # the pattern does see one


def test_sum_over_ranks_builds_its_tensor_on_the_accelerators_current_device(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise StopIteration  # a meta tensor holds no values to read back

    monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self: "meta")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(StopIteration):
        dist.sum_over_ranks([torch.tensor(2.0, dtype=torch.float64), 1, True])  # a CPU tensor among them
    assert seen == [torch.device("meta")]


def test_sum_over_ranks_on_one_rank(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.mul_(2))  # two equal ranks
    assert dist.sum_over_ranks([torch.tensor(1.5, dtype=torch.float64), 3, False]) == [3.0, 6.0, 0.0]


@pytest.mark.parametrize("backend, group", [("nccl", "gloo group"), ("gloo", None)])
def test_max_over_ranks_agrees_on_the_host_in_a_gloo_group(monkeypatch, backend, group):
    """The tiled MLP's tile count is wanted as a Python number: agreed on a CPU tensor in a gloo group
    (created once; a CPU run's default group is one already), never on the accelerator, whose result the
    host could only read back by waiting for the GPU."""
    created, seen = [], []

    def all_reduce(t, op=None, group=None):
        seen.append((t.device, group))
        t.add_(3)  # another rank's value was 3 longer

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: created.append(kw) or "gloo group")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "_host_group", [])
    assert dist.max_over_ranks(40) == 43 and dist.max_over_ranks(7) == 10
    assert seen == [(torch.device("cpu"), group)] * 2
    assert created == ([{"backend": "gloo"}] if group else [])


@pytest.mark.parametrize("local_rank, visible, index", [(0, 8, 0), (5, 8, 5), (3, 1, 0)])
def test_the_device_a_rank_drives(local_rank, visible, index):
    """LOCAL_RANK where the node's GPUs are all visible; device 0 where SLURM binds one GPU per task."""
    assert dist.device_index(local_rank, visible) == index


def test_two_ranks_on_one_device_are_refused_in_one_line():
    with pytest.raises(UserError, match="local rank 5 sees only 4"):
        dist.device_index(5, 4)  # local_rank % visible would put ranks 1 and 5 on one GPU
    dist.refuse_shared_devices([("n0", "GPU-a"), ("n0", "GPU-b"), ("n1", "GPU-a")])  # same uuid, other host
    with pytest.raises(UserError, match="ranks 0 and 2 drive the same GPU on n0"):
        dist.refuse_shared_devices([("n0", "GPU-a"), ("n0", "GPU-b"), ("n0", "GPU-a")])


def test_a_slurm_task_bound_to_one_gpu_starts_deepspeed_on_that_gpu(monkeypatch):
    """srun --gpus-per-task=1: task 3 of a node sees one GPU, as device 0, with SLURM_LOCALID=3. DeepSpeed
    passes device_id=cuda:LOCAL_RANK to the process group (and the engine sets that device), so LOCAL_RANK
    must read 0 by the time DeepSpeed starts, or torch raises "device_id cuda:3 is out of range"."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what init_distributed sets is undone afterwards
        monkeypatch.delenv(name)
    for name, value in {"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
                        "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[01-02]"}.items():
        monkeypatch.setenv(name, value)
    chosen, seen_by_deepspeed = [], []
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "device_name", lambda self, *a: "cuda")
    monkeypatch.setattr(accelerator, "device_count", lambda self: 1)
    monkeypatch.setattr(accelerator, "set_device", lambda self, i: chosen.append(i))

    def init_distributed(**kwargs):
        seen_by_deepspeed.append(os.environ["LOCAL_RANK"])
        raise StopIteration  # no process group to join here

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(StopIteration):
        dist.init_distributed()
    assert chosen == [0] and seen_by_deepspeed == ["0"]
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"]) == ("7", "gpu01")


def test_no_visible_device_is_one_line():
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        dist.device_index(0, 0)


def test_deterministic_cuda_settings(monkeypatch):
    calls = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: calls.append(on))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(dist, "on_cuda", lambda: True)
    dist.set_deterministic(False)
    assert calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    dist.set_deterministic(True)
    assert calls == [True] and __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True


def test_a_cpu_run_touches_no_cuda_rng_even_where_cuda_exists(monkeypatch):
    """A CPU-accelerator run on a GPU machine must not create CUDA contexts for its RNG."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: pytest.fail("CUDA RNG read by a CPU run"))
    state = dist.capture_rng()
    assert "cuda" not in state
    dist.restore_rng({**state, "cuda": [0]})  # a checkpoint from a GPU run, resumed on the CPU
