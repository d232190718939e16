"""The run config as text: how every section types a value (`Section`), YAML files, `key=value` overrides,
the one-line error format of a validation error and the one-line reference of every field (the schema
itself is config.py and data_config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ds_finetune.errors import UserError


class Section(BaseModel):
    # Unknown keys are errors: a typo in a config must never be silently ignored. inf/nan are never a
    # sensible setting. YAML types `output_dir=2024` as an int; for a str field that is still the path.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False,
                              coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info):
        # pydantic's lax mode takes True as 1 (even for Literal[0, 1, 2, 3]): `train.zero_stage=true` or
        # `train.max_steps=yes` must be a wrong-type error, not stage 1 / one step.
        annotation = cls.model_fields[info.field_name].annotation
        numeric = annotation in (int, float, Optional[int], Optional[float]) or (
            get_origin(annotation) is Literal and all(type(a) is int for a in get_args(annotation)))
        if isinstance(value, bool) and numeric:
            raise ValueError("Input should be a number, not true/false")
        return value


def _one_line(value: Any, limit: int = 80) -> str:
    """A user-supplied key (as is when printable) or value (repr) for a one-line message, bounded."""
    try:
        text = value if isinstance(value, str) and value.isprintable() else repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits() cannot even be printed
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_validation_error(err: ValidationError) -> str:
    """One line: `config error: train.zero_stage: Input should be 0, 1, 2 or 3 (got 4)`."""
    parts = []
    for e in err.errors():
        key = ".".join(_one_line(str(p)) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in e["loc"][:-1])
            msg = "unknown key" + (f" (see `ds-finetune config show-schema` for {section}'s keys)" if section else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)) and got is not None:
            msg += f" (got {_one_line(got if not isinstance(got, str) else repr(got))})"
        # A model validator's message already names its keys (`train.offload_param needs ...`).
        parts.append(msg if not e["loc"] or msg.startswith(("set ", f"{key}.")) else f"{key}: {msg}")
    return "config error: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-5` -> (['train', 'lr'], 2e-05). Values are YAML scalars; the schema types them."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise UserError(f"bad override {text!r}: write key=value with a dotted key, e.g. train.zero_stage=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        # Not YAML (or an int too long for Python to parse, or nesting too deep): keep the string and
        # let the schema judge it.
        value = raw
    return [k.strip() for k in keys], value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise UserError(f"bad override {text!r}: {_one_line('.'.join(keys[:i + 1]))} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def load_raw_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config error: {path}: no such file; pass a YAML run config such as configs/tiny.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark is not None else ""
        # A ReaderError (control character) has no `problem`, and its str() spans two lines.
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
        raise UserError(f"config error: {path}{where} is not valid YAML ({_one_line(problem, 200)}); fix the syntax")
    except UnicodeDecodeError:
        raise UserError(f"config error: {path} is not UTF-8 text")
    except (ValueError, RecursionError) as e:  # PyYAML: an int over Python's digit limit; nesting too deep
        raise UserError(f"config error: {path} is not a usable YAML config ({_one_line(str(e), 120)})")
    except OSError as e:
        raise UserError(f"config error: {path}: cannot read it ({e.strerror or e})")
    if raw is None:
        raise UserError(f"config error: {path} is empty; it needs sections model, data, train, output_dir")
    if not isinstance(raw, dict):
        raise UserError(f"config error: {path} must be a mapping of sections (model, data, train, ...), "
                        f"not a {type(raw).__name__}")
    return raw


def split_resume_arg(resume: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--resume key=value` parses the override as the checkpoint path (the path is optional); take it back:
    a value with `=` that is not an existing path is an override and --resume means "the newest"."""
    if resume and resume != "auto" and "=" in resume and not Path(resume).exists():
        return "auto", [resume, *overrides]
    return resume, list(overrides)


def field_lines(root: type[BaseModel]) -> list[str]:
    """`section.key (default ...): description` for every field of the config schema `root` (its sections
    and their nested models, such as a list of sources)."""
    lines = []
    sections = [(None, root)] + [(name, f.annotation) for name, f in root.model_fields.items()
                                  if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    for section, model in sections:
        for name, field in model.model_fields.items():
            if section is None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                continue
            key = f"{section}.{name}" if section else name
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{key} (default {default}): {field.description}")
            args = [b for a in get_args(field.annotation) for b in (get_args(a) if get_origin(a) is list else [a])]
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            for sub_name, sub in (nested[0].model_fields.items() if nested else ()):
                sub_default = "required" if sub.is_required() else repr(sub.get_default(call_default_factory=True))
                lines.append(f"{key}.{sub_name} (default {sub_default}): {sub.description}")
    return lines
