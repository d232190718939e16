"""Ranks started by MPI or SLURM find their rank, world and master without RANK/WORLD_SIZE; a rank that
fails tells the others (decide) instead of leaving them in a collective."""
import pytest
import torch

import harness
from ds_finetune import dist
from ds_finetune.dist import first_host, rank_environment
from ds_finetune.errors import UserError


def test_launcher_variables_win_when_present():
    env = {"RANK": "3", "WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert "RANK" not in rank_environment(env)  # torchrun's / DeepSpeed's own: kept as they are


def test_openmpi_on_one_node():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    got = rank_environment(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"]) == ("1", "2", "1", "2")
    assert got["MASTER_ADDR"] == "127.0.0.1" and got["MASTER_PORT"] == "29500"  # the same on every rank


def test_mpi_on_several_nodes_needs_master_addr():
    env = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    with pytest.raises(UserError, match="MASTER_ADDR"):
        rank_environment(env)
    assert rank_environment({**env, "MASTER_ADDR": "n0"})["RANK"] == "5"


def test_slurm_takes_the_master_from_the_nodelist():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    got = rank_environment(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert got["MASTER_ADDR"] == "gpu07"


@pytest.mark.parametrize("nodelist, first", [("a", "a"), ("gpu[07-09,12],cpu1", "gpu07"), ("n[3,5]", "n3"),
                                             ("x1,x2", "x1")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.multiproc
def test_two_ranks_given_only_slurm_variables_train_together(reference_run, tmp_path):
    """What `srun --ntasks 2 python launch/train.py ...` gives each task: no RANK, no WORLD_SIZE."""
    argv = harness.train_argv(tmp_path, ["train.zero_stage=2"], nproc=1)
    port = str(harness.free_port())
    procs = []
    for rank in range(2):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}
        procs.append(harness.start(argv, env_extra=env, log=tmp_path.parent / f"slurm-rank{rank}.log"))
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path.parent / "slurm-rank0.log").read_text()[-3000:]
    harness.assert_same_run(tmp_path, reference_run(2))


def test_cpu_ranks_started_without_local_size_never_run_numactl(monkeypatch):
    """torchrun and srun set no LOCAL_SIZE (DeepSpeed's launcher does); without it DeepSpeed's CPU accelerator
    counts its devices by running `numactl --hardware`, which ZeRO-3 does at every reduce-scatter."""
    import subprocess

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what init_distributed sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "3")
    monkeypatch.setattr(get_accelerator(), "device_name", lambda *a: "cpu")
    ran = []
    monkeypatch.setattr(subprocess, "check_output", lambda argv, *a, **kw: ran.append(argv) or b"available: 1 nodes")

    def init_distributed(**kwargs):
        raise StopIteration  # no process group to join here

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(StopIteration):
        dist.init_distributed()
    assert get_accelerator().device_count() == 3 and ran == []
