"""Config errors as a property: whatever a user writes into a run config or an override, loading it either gives
a RunConfig or a UserError whose message is one line; never any other exception, never a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_finetune.config import RunConfig, validate_config
from ds_finetune.config_text import apply_overrides
from ds_finetune.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
BASE = yaml.safe_load(TINY.read_text())
KNOWN_KEYS = sorted({k for section in BASE.values() if isinstance(section, dict) for k in section}
                    | set(BASE) | {"global_batch_size", "offload_param", "offload_optimizer", "epochs",
                                   "name_or_path", "packing", "dir", "every_minutes"})

keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12))
# Values as YAML can produce them. (An int over Python's 4300-digit limit cannot come out of YAML or JSON:
# the parser refuses it, which the override strings below and test_config's file tests cover.)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-5, max_value=5),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["fp32", "bf16", "cpu", "none", "chat", "llama", "cosine", "2e-5", "1e999", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
override_values = st.one_of(
    st.text(max_size=20), st.sampled_from(["3", "-1", "0", "true", "null", "[1, 2]", "{a: 1}", "2e-5", ".nan",
                                           "'x'", "!!binary aGk=", "1" + "0" * 5000, "[" * 2000, "a: b: c", "@x"]),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip() if _dumpable(v) else "x"),
)
override_keys = st.one_of(
    st.lists(st.sampled_from(KNOWN_KEYS), min_size=1, max_size=3).map(".".join),
    st.text(max_size=15),
)
overrides = st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=25))


def _dumpable(value) -> bool:
    try:
        yaml.safe_dump(value)
        return True
    except (yaml.YAMLError, ValueError):
        return False


def paths(node: dict, prefix=()):
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from paths(value, prefix + (key,))


def parent_of(raw: dict, path: tuple):
    node = raw
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutated_configs(draw) -> dict:
    raw = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        existing = list(paths(raw))
        op = draw(st.sampled_from(["delete", "replace", "add"]))
        if op in ("delete", "replace") and existing:
            path = draw(st.sampled_from(existing))
            node = parent_of(raw, path)
            if op == "delete":
                del node[path[-1]]
            else:
                node[path[-1]] = draw(values)
        else:
            sections = [()] + [p for p in existing if isinstance(parent_of(raw, p)[p[-1]], dict)]
            where = draw(st.sampled_from(sections))
            node = parent_of(raw, where)[where[-1]] if where else raw
            node[draw(keys)] = draw(values)
    return raw


def load(raw: dict, override_list: list[str]):
    try:
        return validate_config(apply_overrides(raw, override_list))
    except UserError as e:
        return e


def assert_config_or_one_line_error(outcome) -> None:
    if isinstance(outcome, UserError):
        assert outcome.message and outcome.message.splitlines() == [outcome.message], repr(outcome.message)
        assert outcome.exit_code == 2
    else:
        assert isinstance(outcome, RunConfig)
        # What `--dry-run` prints as the resolved config loads back to the same config (compared as text:
        # a nan inside the free-form model.config is not equal to itself).
        resolved = outcome.to_yaml()
        assert validate_config(yaml.safe_load(resolved)).to_yaml() == resolved


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated_configs(), override_list=st.lists(overrides, max_size=3))
def test_any_config_and_overrides_load_or_fail_with_one_line(raw, override_list):
    assert_config_or_one_line_error(load(raw, override_list))


@settings(max_examples=100, deadline=None)
@given(override_list=st.lists(st.builds(lambda k, v: f"{k}={v}",
                                        st.sampled_from(["train.zero_stage", "train.lr", "train.micro_batch_size",
                                                         "train.max_steps", "data.max_length", "model.dtype",
                                                         "logging.sample_ids", "output_dir", "train.seed"]),
                                        override_values), min_size=1, max_size=2))
def test_overrides_of_real_keys_load_or_fail_with_one_line(override_list):
    """Mostly-valid keys reach the value checks (the broad test above mostly stops at the key)."""
    assert_config_or_one_line_error(load(copy.deepcopy(BASE), override_list))


def test_unmutated_base_with_no_overrides_loads():
    """The property test's starting point is itself valid, so success is reachable."""
    assert isinstance(load(copy.deepcopy(BASE), []), RunConfig)


# ------------------------------------------------------------------------------- through the real CLI

def _cli_safe(text: str) -> bool:
    # argv cannot hold NUL; a leading `-` is a click option, not an override.
    return "\x00" not in text and not text.startswith("-")


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(raw=mutated_configs().filter(_dumpable),
       override_list=st.lists(overrides.filter(_cli_safe), max_size=2))
def test_random_configs_through_the_cli_never_traceback(tmp_path, raw, override_list):
    """In process (the CLI's own code path; test_config runs real processes for a few): an exception other
    than the CLI's exit is what a user would see as a traceback."""
    from click.testing import CliRunner

    from ds_finetune.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    p = CliRunner().invoke(main, ["train", str(path), "--dry-run", *override_list], env={"DS_ACCELERATOR": "cpu"})
    assert p.exception is None or isinstance(p.exception, SystemExit), p.exception
    assert p.exit_code in (0, 2), (p.exit_code, p.stderr)
    if p.exit_code == 2:
        line = p.stderr.rstrip("\n")
        assert line.splitlines() == [line] and line.startswith("error: "), p.stderr
    else:
        assert "# resolved run config" in p.stdout
