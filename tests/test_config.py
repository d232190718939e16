"""Run config and its errors: the tiny config loads; every config mistake is one line naming
the key, exit code 2, no traceback; overrides are typed and validated; the resume fingerprint tells
exactness-breaking changes from harmless ones; `config show-schema` documents every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ds_finetune.cli import main
from harness import assert_one_line_error
from ds_finetune.config import (CheckpointConfig, CpoConfig, DpoConfig, EvalConfig, GrpoConfig, KtoConfig,
                                LoggingConfig, LoraConfig, ModelConfig, OrpoConfig, RewardConfig, RewardFunctionConfig,
                                RunConfig, SimpoConfig, TrainConfig, WandbConfig, load_config)
from ds_finetune.data_config import DataConfig, EvalSourceConfig, SourceConfig
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "dpo": DpoConfig, "orpo": OrpoConfig,
            "simpo": SimpoConfig, "cpo": CpoConfig, "grpo": GrpoConfig, "rewards": RewardFunctionConfig,
            "kto": KtoConfig, "reward": RewardConfig}


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("ds-finetune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ds_finetune.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console script in a child process: what a user's terminal shows."""
    return subprocess.run(cli_command() + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), env={"DS_ACCELERATOR": "cpu"})


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


# ----------------------------------------------------------------------------------------- tiny.yaml

def test_shipped_tiny_config_loads_with_its_values():
    cfg = load_config(TINY)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.config["model_type"] == "llama" and cfg.model.config["hidden_size"] == 64
    assert cfg.model.name_or_path is None and cfg.model.tokenizer == "assets/tiny-tokenizer"
    assert cfg.model.dtype == "fp32"
    assert (cfg.data.path, cfg.data.format, cfg.data.max_length) == ("data/tiny/chat.jsonl", "chat", 128)
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.max_steps, t.zero_stage, t.seed) == (4, 2, 40, 2, 1234)
    assert t.lr == pytest.approx(3e-3) and t.lr_schedule == "cosine" and t.warmup_steps == 4
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.checkpoint.save_on_signal) == (10, 2, True)
    assert cfg.logging.sample_ids is True
    assert cfg.output_dir == "runs/tiny"
    assert cfg.checkpoint_dir == Path("runs/tiny/checkpoints")


def test_global_batch_is_micro_times_accum_times_world():
    cfg = load_config(TINY)
    assert cfg.batch_layout(1) == (4, 2, 8)
    assert cfg.batch_layout(3) == (4, 2, 24)


def test_global_batch_size_fixes_grad_accum_for_any_world_size():
    cfg = load_config(TINY, ["train.global_batch_size=16"])
    assert cfg.batch_layout(1) == (4, 4, 16)
    assert cfg.batch_layout(2) == (4, 2, 16)
    assert cfg.batch_layout(4) == (4, 1, 16)
    with pytest.raises(UserError) as e:
        cfg.batch_layout(3)
    assert "train.global_batch_size 16" in e.value.message and "[1, 2, 4]" in e.value.message


def test_dry_run_prints_the_resolved_config_and_exits_0():
    result = invoke("train", str(TINY), "--dry-run", "train.zero_stage=3")
    assert result.exit_code == 0, result.stderr
    resolved = result.stdout.split("# resolved run config\n", 1)[1].split("# DeepSpeed config\n", 1)[0]
    assert yaml.safe_load(resolved)["train"]["zero_stage"] == 3
    assert "# world_size=1 micro_batch_size=4 grad_accum=2 global_batch=8" in result.stdout


def test_dry_run_prints_the_deepspeed_config_the_ranks_will_use(monkeypatch):
    """A GPU launch gets the GPU form (overlapped reduction, pinned offload), not the CPU one."""
    import ds_finetune.launcher

    def deepspeed_config(*args):
        result = invoke("train", str(TINY), "--dry-run", "train.zero_stage=2", "train.offload_optimizer=cpu", *args)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout.split("# DeepSpeed config\n", 1)[1])["zero_optimization"]

    cpu = deepspeed_config()
    assert cpu["overlap_comm"] is False and cpu["offload_optimizer"]["pin_memory"] is False
    monkeypatch.setattr(ds_finetune.launcher, "has_accelerator", lambda: True)
    gpu = deepspeed_config("--num-gpus", "2")
    assert gpu["overlap_comm"] is True and gpu["offload_optimizer"]["pin_memory"] is True


# ---------------------------------------------------------------------- config errors: the real CLI

@pytest.mark.parametrize("args, names", [
    (["foo=1"], ["foo", "unknown key"]),
    (["train.zero_stage=4"], ["train.zero_stage", "4"]),
    (["train.global_batch_size=10", "--num-gpus", "4"], ["train.global_batch_size", "10"]),
], ids=["unknown-key", "zero-stage-4", "global-batch-not-divisible"])
def test_config_error_in_a_real_process_is_one_line_exit_2_no_traceback(args, names):
    p = run_cli("train", "configs/tiny.yaml", "--dry-run", *args)
    assert_one_line_error(p, *names, code=2, alone=True)


def test_bad_yaml_in_a_real_process_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  dtype: [fp32\n")
    p = run_cli("train", path, "--dry-run")
    assert_one_line_error(p, path, "line 3", "not valid YAML", code=2, alone=True)


def test_missing_config_file_in_a_real_process(tmp_path):
    path = str(tmp_path / "nope.yaml")
    p = run_cli("train", path, "--dry-run")
    assert_one_line_error(p, path, "no such file", code=2, alone=True)


# ------------------------------------------------------------------------ config errors: CliRunner

def cli_error(*args: str, names=()) -> str:
    result = invoke("train", *args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    proc = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    return assert_one_line_error(proc, *names, code=2, alone=True)


@pytest.mark.parametrize("override, names", [
    ("train.foo=1", ["train.foo", "unknown key"]),
    ("checkpoint.every_step=5", ["checkpoint.every_step", "unknown key"]),
    ("train.micro_batch_size=abc", ["train.micro_batch_size", "'abc'"]),
    ("train.max_steps=true", ["train.max_steps", "true/false"]),
    ("train.zero_stage=true", ["train.zero_stage"]),
    ("data.packing=maybe", ["data.packing", "'maybe'"]),
    ("model.dtype=fp8", ["model.dtype", "'fp8'"]),
    ("train=5", ["train", "5"]),
    ("train.zero_stage=4", ["train.zero_stage", "(got 4)"]),
    ("train.lr=-1e-4", ["train.lr", "greater than 0"]),
    ("train.lr=.inf", ["train.lr"]),
    ("train.weight_decay=.nan", ["train.weight_decay", "finite"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size", "(got 0)"]),
    ("train.offload_param=cpu", ["train.offload_param", "zero_stage=3"]),
    ("train.offload_optimizer=cpu train.zero_stage=0", ["train.offload_optimizer"]),
    ("model.config=null", ["model.name_or_path", "model.config"]),
    ("model.config.model_type=null", ["model.config", "model_type"]),
    ("model.attn_implementation=fast", ["model.attn_implementation", "'fast'"]),
    ("model.attn_implementation=flash_attention_2", ["model.attn_implementation", "fp32", "model.dtype: bf16"]),
    ("model.attn_implementation=sdpa model.config.attn_implementation=eager", ["model.attn_implementation", "disagree"]),
    ("output_dir.sub=x", ["bad override", "output_dir is not a section"]),
    ("trainzero", ["bad override", "'trainzero'", "key=value"]),
    ("=3", ["bad override", "'=3'"]),
    ("train..lr=1", ["bad override"]),
])
def test_every_config_mistake_is_one_line_naming_the_key(override, names):
    cli_error(str(TINY), "--dry-run", *override.split(), names=names)


def test_the_model_is_built_with_the_attention_the_config_names():
    from ds_finetune.fingerprint import config_fingerprint
    from ds_finetune.model import build_model

    for attention in ("eager", "sdpa"):
        cfg = load_config(TINY, [f"model.attn_implementation={attention}"])
        assert build_model(cfg, {}).config._attn_implementation == attention
    assert load_config(TINY, ["model.attn_implementation=flash_attention_2", "model.dtype=bf16"]).model.attention \
        == "flash_attention_2"
    # Unset, the fingerprint's model section is what checkpoints saved before the key recorded.
    model = config_fingerprint(load_config(TINY), 8, "hash")["exact"]["model"]
    assert "attn_implementation" not in model and model["dtype"] == "fp32"
    assert config_fingerprint(load_config(TINY, ["model.attn_implementation=eager"]), 8, "hash")["exact"]["model"][
        "attn_implementation"] == "eager"


def test_global_batch_not_divisible_by_micro_times_world_names_sizes_that_fit():
    line = cli_error(str(TINY), "--dry-run", "train.global_batch_size=12", "--num-gpus", "2",
                     names=["train.global_batch_size 12", "4×2"])
    assert "micro_batch_size in [1, 2, 3, 6]" in line and "world size in [1, 3]" in line


@pytest.mark.parametrize("text, names", [
    ("", ["{path}", "is empty"]),
    ("# only a comment\n", ["{path}", "is empty"]),
    ("- model\n- data\n", ["{path}", "mapping", "list"]),
    ("just a string\n", ["{path}", "mapping", "str"]),
    ("a:\n  b: \"\x01\"\n", ["{path}", "not valid YAML"]),
    ("x: 1" + "0" * 5000 + "\n", ["{path}", "not a usable YAML config"]),
    ("model: {config: {model_type: llama}}\n", ["model.tokenizer", "data: required key is missing"]),
    ('"a\\nb": 1\n', ["'a\\nb': unknown key", "model: required key is missing"]),
], ids=["empty", "comment-only", "list", "scalar", "control-char", "huge-int", "no-tokenizer", "newline-key"])
def test_bad_config_files_are_one_line_errors(tmp_path, text, names):
    path = write(tmp_path, text)
    cli_error(path, "--dry-run", names=[n.replace("{path}", path) for n in names])


def test_unknown_nested_key_in_the_file_is_named_with_its_section(tmp_path):
    raw = tiny_raw()
    raw["data"]["pth"] = "x.jsonl"
    cli_error(write(tmp_path, yaml.safe_dump(raw)), "--dry-run", names=["data.pth: unknown key"])


def test_missing_model_source_is_an_error(tmp_path):
    raw = tiny_raw()
    del raw["model"]["config"]
    cli_error(write(tmp_path, yaml.safe_dump(raw)), "--dry-run",
              names=["set exactly one of model.name_or_path or model.config"])


def test_both_model_sources_is_an_error():
    cli_error(str(TINY), "--dry-run", "model.name_or_path=gpt2", names=["model.name_or_path or model.config"])


def test_missing_required_section_is_named(tmp_path):
    raw = tiny_raw()
    del raw["train"]["max_steps"]
    cli_error(write(tmp_path, yaml.safe_dump(raw)), "--dry-run", names=["train.max_steps or train.epochs"])
    del raw["data"]
    cli_error(write(tmp_path, yaml.safe_dump(raw)), "--dry-run", names=["data: required key is missing"])


def test_config_that_is_a_directory_is_an_error(tmp_path):
    cli_error(str(tmp_path), "--dry-run", names=[str(tmp_path), "no such file"])


# ------------------------------------------------------------------------------------------ overrides

def test_overrides_are_typed_by_the_schema():
    cfg = load_config(TINY, ["train.zero_stage=3", "train.lr=2e-5", "data.path=x.jsonl",
                             "logging.sample_ids=false", "model.config.hidden_size=32"])
    assert cfg.train.zero_stage == 3 and type(cfg.train.zero_stage) is int
    assert cfg.train.lr == 2e-5 and type(cfg.train.lr) is float
    assert cfg.data.path == "x.jsonl"
    assert cfg.logging.sample_ids is False
    assert cfg.model.config["hidden_size"] == 32
    assert cfg.model.config["num_hidden_layers"] == 2, "a nested override keeps the other keys"


def test_override_of_a_numeric_looking_string_field_stays_a_string():
    cfg = load_config(TINY, ["output_dir=2024", "data.split=1"])
    assert cfg.output_dir == "2024" and cfg.data.split == "1"


def test_override_can_add_an_optional_section_and_later_ones_win():
    cfg = load_config(TINY, ["checkpoint.dir=/tmp/ck", "train.seed=1", "train.seed=7"])
    assert cfg.checkpoint_dir == Path("/tmp/ck") and cfg.train.seed == 7


def test_override_value_with_equals_sign_and_spaces_is_kept_whole():
    cfg = load_config(TINY, ["output_dir=runs/a=b c"])
    assert cfg.output_dir == "runs/a=b c"


def test_override_is_validated_like_the_file():
    with pytest.raises(UserError) as e:
        load_config(TINY, ["train.zero_stage=3", "train.offload_param=cpu", "train.grad_accum=0"])
    assert "train.grad_accum" in e.value.message and e.value.exit_code == 2


# ---------------------------------------------------------------------------------------- fingerprint

def fingerprint(overrides=(), global_batch=8, data_hash="a" * 64):
    return config_fingerprint(load_config(TINY, list(overrides)), global_batch, data_hash)


def test_fingerprint_of_the_same_run_has_no_changes():
    assert changed_exact_keys(fingerprint(), fingerprint()) == []


@pytest.mark.parametrize("kwargs, changed", [
    (dict(overrides=["train.seed=99"]), ["train.seed"]),
    (dict(data_hash="b" * 64), ["data.content_sha256"]),
    (dict(global_batch=16), ["train.global_batch"]),
    (dict(overrides=["data.max_length=64"]), ["data.max_length"]),
    (dict(overrides=["model.config.hidden_size=32"]), ["model.config"]),
    (dict(overrides=["train.lr=1e-3"]), ["train.optimizer.lr"]),
])
def test_changes_that_break_exactness_are_reported(kwargs, changed):
    assert changed_exact_keys(fingerprint(), fingerprint(**kwargs)) == changed


@pytest.mark.parametrize("overrides", [
    ["train.max_steps=80"], ["train.epochs=3"], ["logging.sample_ids=false", "logging.tensorboard=false"],
    ["checkpoint.every_steps=1", "checkpoint.keep_last=5"],
])
def test_harmless_changes_are_not_reported(overrides):
    saved, current = fingerprint(), fingerprint(overrides)
    assert saved != current, "the change must reach the fingerprint at all"
    assert changed_exact_keys(saved, current) == []


def test_a_chunked_checkpoint_from_another_loss_implementation_is_reported():
    """The chunked loss's implementation is part of a chunked run's fingerprint (its summation order);
    a full-logits run records none, so a change of the chunked implementation does not touch it."""
    saved = fingerprint()
    del saved["exact"]["train.loss_implementation"]  # as saved before the fused loss
    assert changed_exact_keys(saved, fingerprint()) == ["train.loss_implementation"]
    full = fingerprint(["train.loss_chunk_tokens=0"])
    assert "train.loss_implementation" not in full["exact"]
    assert changed_exact_keys(full, fingerprint(["train.loss_chunk_tokens=0"])) == []
    # v2 changed only half heads' weight gradients (fp32 accumulation on CUDA): an fp32 run's checkpoint
    # from v1 still resumes, a bf16 one does not
    assert fingerprint()["exact"]["train.loss_implementation"] == "fused-linear-ce-v1"
    assert fingerprint(["model.dtype=bf16"])["exact"]["train.loss_implementation"] == "fused-linear-ce-v2"


def test_moving_the_same_data_elsewhere_is_not_reported():
    saved = fingerprint(data_hash="c" * 64)
    moved = fingerprint(["data.path=elsewhere/chat.jsonl"], data_hash="c" * 64)
    assert changed_exact_keys(saved, moved) == []


# ---------------------------------------------------------------------------------------- show-schema

def test_every_field_of_every_section_has_a_description():
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            assert field.description and field.description.strip(), f"{section}.{name} has no description"
    assert RunConfig.model_fields["output_dir"].description


def test_show_schema_lists_every_field_with_its_description():
    result = invoke("config", "show-schema")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    by_key = {line.split(" ", 1)[0]: line for line in lines}
    expected = {f"{s}.{n}": f.description for s, m in SECTIONS.items() for n, f in m.model_fields.items()}
    expected["output_dir"] = RunConfig.model_fields["output_dir"].description
    expected["deepspeed"] = RunConfig.model_fields["deepspeed"].description
    expected["rewards"] = RunConfig.model_fields["rewards"].description
    expected.update({f"logging.wandb.{n}": f.description for n, f in WandbConfig.model_fields.items()})
    expected.update({f"model.lora.{n}": f.description for n, f in LoraConfig.model_fields.items()})
    expected.update({f"data.sources.{n}": f.description for n, f in SourceConfig.model_fields.items()})
    expected.update({f"eval.sources.{n}": f.description for n, f in EvalSourceConfig.model_fields.items()})
    assert set(by_key) == set(expected)
    for key, description in expected.items():
        assert by_key[key].endswith(f": {description}"), by_key[key]
    assert "train.zero_stage (default 2): " in by_key["train.zero_stage"]
    assert "data.path (default None): " in by_key["data.path"]
