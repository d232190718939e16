"""Which checkpoint --resume picks, in-process (no launch): unfinished saves are leftovers, damage is an
error, and a fresh start says what it replaces before it replaces anything."""
import json
from pathlib import Path

import pytest

import harness
from ds_finetune.checkpoint import resume
from ds_finetune.config import load_config
from ds_finetune.errors import UserError


@pytest.fixture
def cfg(tmp_path):
    return load_config(harness.TINY, [f"output_dir={tmp_path}"])


def write_metrics(cfg, steps):
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def test_only_unfinished_saves_start_fresh_and_say_what_is_replaced(cfg, capsys):
    (cfg.checkpoint_dir / "step_00000003").mkdir(parents=True)  # a first save killed before its commit
    write_metrics(cfg, [1, 2, 3])
    assert resume._choose_on_rank0(cfg, "auto", overwrite=False, discard_newer=False) is None
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "starting fresh" in out
    assert "holds 3 lines of an earlier attempt" in out


def test_a_damaged_checkpoint_and_nothing_else_is_an_error_not_a_fresh_start(cfg):
    tag = cfg.checkpoint_dir / "step_00000003"
    tag.mkdir(parents=True)
    (tag / "manifest.json").write_text(json.dumps({"step": 3, "files": {"x.pt": {"size": 4, "sha256": "0"}}}))
    with pytest.raises(UserError, match="no checkpoint .* verifies .*missing file x.pt.*--overwrite"):
        resume._choose_on_rank0(cfg, "auto", overwrite=False, discard_newer=False)


def test_a_fresh_start_without_checkpoints_says_it_replaces_old_metrics(cfg, capsys):
    write_metrics(cfg, [1, 2])
    assert resume._choose_on_rank0(cfg, None, overwrite=False, discard_newer=False) is None
    assert "holds 2 lines of an earlier attempt" in capsys.readouterr().out

