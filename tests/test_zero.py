"""`ds-finetune config zero`: every ZeRO config we generate is one DeepSpeed's own parser accepts, with the values
we meant and nothing left as "auto"; illegal combinations are one-line user errors."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: pick the CPU accelerator

import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

from ds_finetune.cli import main  # noqa: E402
from ds_finetune.config import load_config  # noqa: E402
from ds_finetune.errors import UserError  # noqa: E402
from ds_finetune.zero import build_zero_config, zero_config_for_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

LAYOUTS = [(1, 1, 1), (4, 2, 1), (2, 3, 4), (8, 1, 2)]  # (micro, accum, world)
VARIANTS = [
    (stage, dtype, opt, param)
    for stage, dtype, opt, param in itertools.product((0, 1, 2, 3), ("fp32", "bf16", "fp16"), ("none", "cpu"),
                                                      ("none", "cpu"))
    if not (opt == "cpu" and stage == 0) and not (param == "cpu" and stage != 3)
]


class DataParallelTopology:
    """DeepSpeed's `mpu` interface, as Megatron-style trainers hand it to DeepSpeedConfig: it reports how many
    data-parallel ranks the config is for. DeepSpeedConfig asks it only for get_data_parallel_world_size()
    and only once deepspeed.comm is initialised (else it assumes a world of 1; runtime/config.py 0.19)."""

    def __init__(self, data_parallel_size: int):
        self.data_parallel_size = data_parallel_size

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_model_parallel_world_size(self) -> int:
        return 1


@pytest.fixture(scope="module")
def comm(tmp_path_factory):
    """A real one-process gloo group for DeepSpeedConfig's world-size query, torn down after this module.
    Nothing is JIT-built: DeepSpeed's CPU shm all-reduce is skipped, as in the training processes."""
    from deepspeed import comm as dist

    from ds_finetune.ds_internals import skip_cpu_inference_all_reduce

    skip_cpu_inference_all_reduce()
    env_before = dict(os.environ)
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=0, world_size=1,
                          auto_mpi_discovery=False, verbose=False)
    yield dist
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env_before)


def parse_with_deepspeed(config: dict, world: int, request) -> DeepSpeedConfig:
    if world == 1:
        return DeepSpeedConfig(json.loads(json.dumps(config)))
    request.getfixturevalue("comm")
    return DeepSpeedConfig(json.loads(json.dumps(config)), mpu=DataParallelTopology(world))


def precision_flags(ds: DeepSpeedConfig) -> tuple[bool, bool]:
    """(bf16, fp16) as DeepSpeed parsed them; the attribute names moved in 0.18."""
    if hasattr(ds, "bfloat16_config"):
        return ds.bfloat16_config.enabled, ds.float16_config.enabled
    return ds.bfloat16_enabled, ds.fp16_enabled


def all_values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from all_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_values(value)
    else:
        yield node


@pytest.mark.parametrize("micro, accum, world", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("stage, dtype, offload_optimizer, offload_param", VARIANTS,
                         ids=[f"z{s}-{d}-opt_{o}-param_{p}" for s, d, o, p in VARIANTS])
def test_every_zero_variant_is_accepted_by_deepspeed_with_intended_values(
        request, stage, dtype, offload_optimizer, offload_param, micro, accum, world):
    grad_clip = 0.5 if stage % 2 else 1.0
    config = build_zero_config(stage, micro, accum, world, dtype, grad_clip, offload_optimizer, offload_param,
                               on_gpu=False)
    assert "auto" not in [v for v in all_values(config) if isinstance(v, str)]

    ds = parse_with_deepspeed(config, world, request)

    assert ds.world_size == world
    assert ds.zero_optimization_stage == stage and ds.zero_enabled == (stage > 0)
    assert ds.train_batch_size == micro * accum * world
    assert ds.train_micro_batch_size_per_gpu == micro
    assert ds.gradient_accumulation_steps == accum
    assert ds.gradient_clipping == grad_clip
    assert precision_flags(ds) == (dtype == "bf16", dtype == "fp16")
    if offload_optimizer == "cpu":
        assert ds.zero_config.offload_optimizer.device == "cpu"
        assert ds.zero_force_ds_cpu_optimizer is False, "our client AdamW must be accepted with offload"
    else:
        assert ds.zero_config.offload_optimizer is None
    if offload_param == "cpu":
        assert ds.zero_config.offload_param.device == "cpu"
    else:
        assert ds.zero_config.offload_param is None
    if stage > 0:
        assert ds.zero_config.overlap_comm is False and ds.zero_config.contiguous_gradients is True


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_configs_overlap_the_reduction_and_pin_offloaded_memory(request, stage):
    config = build_zero_config(stage, 1, 1, 2, "bf16", 1.0, "cpu", "cpu" if stage == 3 else "none", on_gpu=True)
    ds = parse_with_deepspeed(config, 2, request)
    assert ds.zero_config.overlap_comm is True
    assert ds.zero_config.offload_optimizer.pin_memory is True
    if stage == 3:
        assert ds.zero_config.offload_param.pin_memory is True


@pytest.mark.parametrize("kwargs, named", [
    (dict(stage=4), "0, 1, 2 or 3"),
    (dict(stage=-1), "0, 1, 2 or 3"),
    (dict(stage=2, offload_param="cpu"), "stage 3"),
    (dict(stage=1, offload_param="cpu"), "stage 3"),
    (dict(stage=0, offload_optimizer="cpu"), "stage 1, 2 or 3"),
    (dict(stage=2, micro_batch_size=0), "micro batch size"),
    (dict(stage=2, grad_accum=0), "grad accum"),
    (dict(stage=2, world_size=0), "world size"),
])
def test_illegal_zero_combinations_are_user_errors(kwargs, named):
    with pytest.raises(UserError) as e:
        build_zero_config(**kwargs)
    assert named in e.value.message and "\n" not in e.value.message
    assert e.value.exit_code == 2


def test_the_reduce_bucket_is_the_hidden_size_squared_when_the_model_says_it(tmp_path, monkeypatch):
    """The reduce bucket is allocated whole on the device (twice at ZeRO 1-2 under overlap_comm): hidden_size^2
    elements as transformers' "auto", at every stage, for an inline config, a folder and a named model in
    the Hugging Face cache; an unknown width keeps DeepSpeed's default."""
    def bucket(config: dict) -> int:
        return config["zero_optimization"]["reduce_bucket_size"]

    for stage in (1, 2, 3):
        assert bucket(build_zero_config(stage, hidden_size=4096)) == 4096 * 4096
        assert bucket(build_zero_config(stage)) == 500_000_000
        assert bucket(zero_config_for_run(load_config(TINY, [f"train.zero_stage={stage}"]), 1)) == 64 * 64  # inline
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    pretrained = load_config(TINY, ["train.zero_stage=2", "model.config=null", f"model.name_or_path={folder}"])
    assert bucket(zero_config_for_run(pretrained, 1)) == 128 * 128
    # A named model, as the hub cache holds it (models--org--name/refs/main -> snapshots/<commit>/).
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    named = load_config(TINY, ["train.zero_stage=3", "model.config=null", "model.name_or_path=org/cached"])
    assert bucket(zero_config_for_run(named, 1)) == 4096 * 4096
    not_cached = load_config(TINY, ["train.zero_stage=3", "model.config=null", "model.name_or_path=org/model"])
    assert bucket(zero_config_for_run(not_cached, 1)) == 500_000_000  # read from the cache only: no network


@pytest.mark.parametrize("world", [1, 2])
def test_run_config_maps_to_the_deepspeed_config_it_trains_with(request, world):
    cfg = load_config(TINY, ["train.zero_stage=3", "train.offload_optimizer=cpu", "train.grad_clip=0.25"])
    ds = parse_with_deepspeed(zero_config_for_run(cfg, world), world, request)
    assert (ds.zero_optimization_stage, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (3, 4, 2)
    assert ds.train_batch_size == 8 * world
    assert ds.gradient_clipping == 0.25
    assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_param is None


def test_run_config_with_global_batch_size_keeps_it_at_every_world_size(request):
    cfg = load_config(TINY, ["train.global_batch_size=16"])
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        ds = parse_with_deepspeed(zero_config_for_run(cfg, world), world, request)
        assert (ds.train_batch_size, ds.gradient_accumulation_steps) == (16, accum)


def test_deepspeed_rejects_a_batch_that_does_not_match_the_world(request):
    """The world-size plumbing above is real: the same config parsed for another world size fails."""
    config = build_zero_config(2, 2, 3, 4)
    request.getfixturevalue("comm")
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        DeepSpeedConfig(config, mpu=DataParallelTopology(2))


# ------------------------------------------------------------------------------------------------ CLI

def test_config_zero_cli_writes_the_json_file(tmp_path):
    out = tmp_path / "ds_z3.json"
    script = Path(sys.executable).with_name("ds-finetune")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ds_finetune.cli"]
    p = subprocess.run(cmd + ["config", "zero", "--stage", "3", "--offload-param", "cpu", "--bf16", "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    written = json.loads(out.read_text())
    assert written == build_zero_config(3, dtype="bf16", offload_param="cpu")
    ds = DeepSpeedConfig(written)
    assert ds.zero_optimization_stage == 3 and precision_flags(ds) == (True, False)
    assert ds.zero_config.offload_param.device == "cpu" and ds.zero_config.offload_optimizer is None


def test_config_zero_cli_prints_to_stdout_with_all_options():
    result = CliRunner().invoke(main, ["config", "zero", "--stage", "2", "--offload-optimizer", "cpu", "--fp16",
                                       "--micro-batch-size", "2", "--grad-accum", "4", "--grad-clip", "0.5"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == build_zero_config(2, 2, 4, 1, "fp16", 0.5, offload_optimizer="cpu")


def test_config_zero_cli_defaults_to_fp32():
    result = CliRunner().invoke(main, ["config", "zero", "--stage", "1"])
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == 1


def test_config_zero_cli_illegal_combination_is_one_line_exit_2():
    result = CliRunner().invoke(main, ["config", "zero", "--stage", "2", "--offload-param", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: parameter offload needs ZeRO stage 3"
    assert result.stdout == ""
