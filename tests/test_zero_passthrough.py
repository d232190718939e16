"""The run config's `deepspeed:` mapping: merged over the generated DeepSpeed config and shown by --dry-run;
a key ds-finetune sets, given another value, is one line naming the run config key to use; in the resume
fingerprint only when set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_finetune.cli import main
from ds_finetune.config import load_config
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.zero import zero_config_for_run

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
NVME_ZERO_PP = ("deepspeed={zero_optimization: {offload_optimizer: {device: nvme, nvme_path: /local_nvme}, "
                "zero_hpz_partition_size: 2, zero_quantized_weights: true, mics_shard_size: 2}, "
                "comms_logger: {enabled: true, verbose: false}, aio: {block_size: 1048576, queue_depth: 8}}")


def dry_run(*overrides: str):
    return CliRunner().invoke(main, ["train", str(TINY), *overrides, "--dry-run"])


def printed_ds_config(stdout: str) -> dict:
    return json.loads(stdout.split("# DeepSpeed config\n", 1)[1])


def test_the_mapping_is_merged_over_the_generated_config_and_shown_by_dry_run():
    result = dry_run(NVME_ZERO_PP)
    assert result.exit_code == 0, result.output
    ds = printed_ds_config(result.stdout)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/local_nvme"}
    assert zero["zero_hpz_partition_size"] == 2 and zero["zero_quantized_weights"] is True
    assert zero["mics_shard_size"] == 2
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True  # ours, kept beside the user's keys
    assert ds["comms_logger"] == {"enabled": True, "verbose": False} and ds["aio"]["queue_depth"] == 8
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the client optimizer is accepted with the offload
    assert ds["train_batch_size"] == 8


def test_repeating_our_value_is_accepted():
    cfg = load_config(TINY, ["deepspeed={train_micro_batch_size_per_gpu: 4, zero_optimization: {stage: 2}}"])
    assert zero_config_for_run(cfg, 1)["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("mapping, key, instead", [
    ("{train_batch_size: 64}", "deepspeed.train_batch_size", "train.global_batch_size"),
    ("{train_micro_batch_size_per_gpu: 1}", "deepspeed.train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("{gradient_accumulation_steps: 4}", "deepspeed.gradient_accumulation_steps", "train.grad_accum"),
    ("{bf16: {enabled: true}}", "deepspeed.bf16.enabled", "model.dtype"),
    ("{fp16: {enabled: true}}", "deepspeed.fp16.enabled", "model.dtype"),
    ("{zero_optimization: {stage: 3}}", "deepspeed.zero_optimization.stage", "train.zero_stage"),
    ("{gradient_clipping: 0.5}", "deepspeed.gradient_clipping", "train.grad_clip"),
    ("{optimizer: {type: Adam}}", "deepspeed.optimizer", "train.lr"),
    ("{scheduler: {type: WarmupLR}}", "deepspeed.scheduler", "train.lr_schedule"),
    ("{checkpoint: {writer: {type: fast}}}", "deepspeed.checkpoint", "checkpoint section"),
    ("{zero_optimization: 3}", "deepspeed.zero_optimization", "must be a mapping"),
    ("{zero_optimization: {offload_param: {device: nvme, nvme_path: /x}}}",
     "deepspeed.zero_optimization.offload_param", "train.zero_stage 3"),
    ("{zero_optimization: {offload_optimizer: {device: nvme}}}", "offload_optimizer.device nvme", "nvme_path"),
])
def test_a_conflicting_key_is_refused_in_one_line_before_launch(mapping, key, instead):
    result = dry_run(f"deepspeed={mapping}")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config error: ") and key in lines[0] \
        and instead in lines[0], lines


def test_values_without_a_json_form_are_refused_at_load():
    with pytest.raises(UserError, match="deepspeed: must hold JSON values"):
        load_config(TINY, ["deepspeed={comms_logger: {since: 2024-01-01}}"])


def test_the_fingerprint_has_the_mapping_only_when_set_and_io_settings_are_harmless():
    plain = config_fingerprint(load_config(TINY), 8, "h")
    assert "deepspeed" not in plain["exact"] and "deepspeed" not in plain["harmless"]  # old checkpoints match
    ds = config_fingerprint(load_config(TINY, [NVME_ZERO_PP]), 8, "h")
    assert ds["exact"]["deepspeed"]["zero_optimization"]["zero_quantized_weights"] is True
    assert ds["exact"]["deepspeed"]["zero_optimization"]["offload_optimizer"] == {"device": "nvme"}
    assert ds["harmless"]["deepspeed"]["comms_logger"]["enabled"] is True
    assert ds["harmless"]["deepspeed"]["zero_optimization"]["offload_optimizer"] == {"nvme_path": "/local_nvme"}
    moved = config_fingerprint(load_config(TINY, [NVME_ZERO_PP.replace("/local_nvme", "/other")]), 8, "h")
    assert changed_exact_keys(ds, moved) == []  # another NVMe folder resumes
    quantised_off = config_fingerprint(load_config(TINY, [NVME_ZERO_PP.replace("weights: true", "weights: false")]),
                                       8, "h")
    assert changed_exact_keys(ds, quantised_off) == ["deepspeed.zero_optimization"]
    assert changed_exact_keys(plain, ds) == ["deepspeed"]
