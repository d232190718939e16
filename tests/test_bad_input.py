"""Bad input outside the data ends in one line before anything launches: an inline model.config that
transformers refuses, an empty output_dir or checkpoint.dir."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_finetune.cli import main
from ds_finetune.config import load_config
from ds_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def dry_run(*overrides: str):
    return CliRunner().invoke(main, ["train", str(TINY), *overrides, "--dry-run"])


def assert_one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a UserError, not a traceback
    assert result.stdout == "", "nothing is launched or printed before the error"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_an_inline_model_config_transformers_refuses_is_one_line_before_launch():
    result = dry_run("model.config.hidden_size=63")
    assert_one_error_line(result, "model.config", "hidden size (63) is not a multiple of the number of attention "
                                                   "heads (4)")


def test_a_wrong_type_in_model_config_is_one_line_before_launch():
    assert_one_error_line(dry_run("model.config.hidden_size=wide"), "model.config", "hidden_size")


def test_the_ranks_meet_the_same_one_line_error_when_building_the_model():
    from ds_finetune.model import build_model
    cfg = load_config(TINY, ["model.config.hidden_size=63"])
    with pytest.raises(UserError, match="hidden size \\(63\\) is not a multiple"):
        build_model(cfg, {})


@pytest.mark.parametrize("override, key", [("output_dir=", "output_dir"), ("output_dir='  '", "output_dir"),
                                           ("checkpoint.dir=", "checkpoint.dir")])
def test_an_empty_run_folder_is_refused_in_one_line(override, key):
    with pytest.raises(UserError, match=f"config error: {key}: must name"):
        load_config(TINY, [override])
    assert_one_error_line(dry_run(override), key, "must name")


def test_a_good_inline_config_still_dry_runs():
    result = dry_run()
    assert result.exit_code == 0, result.output
    assert "# DeepSpeed config" in result.stdout
