"""The `data` section of the run config (and the named sources of `eval.sources`): one file or a
mixture of sources, each with its format and fields."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ds_finetune.config_text import Section
from ds_finetune.errors import UserError


_ADDED_AT_DEFAULT = {"chat_turns": "all", "sources": None, "chosen_field": "chosen", "rejected_field": "rejected",
                     "max_prompt_length": None, "layout": "auto", "chat_template": None, "subset": None,
                     "revision": None, "data_files": None, "label_field": "label", "margin_field": None,
                     "system_prompt": None}
SOURCE_FIELDS = ("format", "split", "text_field", "prompt_field", "completion_field", "messages_field", "chat_turns")
# Source fields added after mixtures' checkpoints existed: in a source's fingerprint only when set.
SOURCE_FIELDS_ADDED = ("layout", "subset", "revision", "data_files")
# Each format's layouts (ds_finetune/data/layouts.py reads them; docs/data.md shows them); the first is
# the one the format always read.
LAYOUTS = {"text": ("text",), "chat": ("messages", "sharegpt", "alpaca"),
           "prompt_completion": ("strings", "conversational"), "preference": ("explicit_prompt", "implicit_prompt"),
           "prompt": ("prompt",),
           "unpaired_preference": ("strings", "conversational")}
Layout = Literal["auto", "text", "messages", "sharegpt", "alpaca", "strings", "conversational", "explicit_prompt",
                 "implicit_prompt", "prompt"]
DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]
_METRIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class EvalSourceConfig(Section):
    """One named source of eval.sources; a format field left out takes the data section's value."""
    path: str = Field(..., description="JSONL/JSON/Parquet file or folder, or a cached `datasets` name.")
    name: Optional[str] = Field(
        None, description="Name in metrics (loss/NAME, eval_loss/NAME); default the file stem; unique.")
    format: Optional[Literal["text", "prompt_completion", "chat", "prompt", "preference", "unpaired_preference"]] = Field(
        None, description="As data.format.")
    split: Optional[str] = Field(None, description="As data.split.")
    text_field: Optional[str] = Field(None, description="As data.text_field.")
    prompt_field: Optional[str] = Field(None, description="As data.prompt_field.")
    completion_field: Optional[str] = Field(None, description="As data.completion_field.")
    messages_field: Optional[str] = Field(None, description="As data.messages_field.")
    chat_turns: Optional[Literal["all", "last"]] = Field(None, description="As data.chat_turns.")
    layout: Optional[Layout] = Field(None, description="As data.layout.")
    subset: Optional[str] = Field(None, description="As data.subset.")
    revision: Optional[str] = Field(None, description="As data.revision.")
    data_files: Optional[DataFiles] = Field(None, description="As data.data_files.")

    @model_validator(mode="after")
    def _named(self):
        # The file stem of `chat.jsonl` or of a folder `code/`, the last part of a dataset name.
        self.name = self.name if self.name is not None else Path(self.path.rstrip("/")).stem
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r} is not a valid metric key (letters, digits, _ . -, at "
                             f"most 64); set its `name`")
        return self


class SourceConfig(EvalSourceConfig):
    """One source of a mixture: an eval source's fields and a weight."""
    weight: float = Field(..., gt=0, description="Share of the samples (weights need not sum to 1).")


def check_layout_fits_format(layout: str, data_format: str) -> None:
    if layout != "auto" and layout not in LAYOUTS[data_format]:
        raise ValueError(f"data.layout {layout} is not a layout of format {data_format}; use auto or one of "
                         f"{', '.join(LAYOUTS[data_format])}")


def unique_names(key: str, sources: list) -> None:
    names = [s.name for s in sources]
    if not names:
        raise ValueError(f"{key}: list at least one source")
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{key}: duplicate source name {twice[0]!r}; give each source a unique `name`")


class DataConfig(Section):
    path: Optional[str] = Field(None, description="JSONL/JSON/Parquet file or folder, or a cached `datasets` name "
                                                  "(or use `sources`).")
    sources: Optional[list[SourceConfig]] = Field(
        None, description="A mixture: a list of {path, weight, name, format and its fields, split}; samples are "
                          "drawn from each source in proportion to its weight (docs/design.md, Data mixtures).")
    format: Literal["text", "prompt_completion", "chat", "preference", "unpaired_preference", "prompt"] = Field(
        "text", description="Row format: text | prompt_completion | chat (messages + chat template) | preference "
                            "(prompt, chosen, rejected; for train.objective dpo, orpo, simpo, cpo, reward) | "
                            "unpaired_preference (prompt, completion, label true/false; for train.objective kto) | "
                            "prompt (a prompt to generate from and any other columns, for the reward functions; for "
                            "train.objective grpo).")
    split: str = Field("train", description="Dataset split to train on; a slice as `datasets` writes it "
                                            "(train[:10%], train[100:200]) also for local files.")
    subset: Optional[str] = Field(None, description="A `datasets` dataset's subset (its config name, `name=`).")
    revision: Optional[str] = Field(None, description="A Hub dataset's revision: a branch, tag or commit.")
    data_files: Optional[DataFiles] = Field(
        None, description="Files of the dataset to read, as `datasets.load_dataset(data_files=)` takes them: "
                          "a pattern, a list, or {split: patterns}; relative to a local folder data.path.")
    layout: Layout = Field(
        "auto", description="How rows are laid out (docs/data.md): auto (detected per row) | chat: messages, "
                            "sharegpt, alpaca | prompt_completion: strings, conversational | preference: "
                            "explicit_prompt, implicit_prompt | unpaired_preference: strings, "
                            "conversational | prompt: prompt.")
    chat_template: Optional[str] = Field(
        None, description="A Jinja file or a template string that replaces the tokenizer's chat template.")
    max_length: int = Field(512, ge=8, le=1_048_576, description="Tokens per sequence; longer rows are truncated.")
    packing: Literal["none", "isolated", "shared"] = Field(
        "none", description="Concatenate rows into sequences of up to max_length tokens: none (false) | isolated "
                            "(true; each row attends only to itself) | shared (rows of a pack attend to each other).")
    text_field: str = Field("text", description="Column holding the text (format text).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (formats prompt_completion, "
                                                    "preference, prompt).")
    completion_field: str = Field("completion", description="Column holding the completion (prompt_completion).")
    messages_field: str = Field("messages", description="Column holding the chat messages (format chat).")
    chosen_field: str = Field("chosen", description="Column holding the preferred completion (format preference).")
    rejected_field: str = Field("rejected", description="Column holding the dispreferred completion (format "
                                                        "preference).")
    label_field: str = Field("label", description="Column holding a row's label, true (desirable) or false "
                                                  "(format unpaired_preference).")
    margin_field: Optional[str] = Field(
        None, description="Format preference: a column of numbers, each pair's margin (train.objective reward "
                          "subtracts it from the reward difference, as TRL's `margin`); None: no margin.")
    max_prompt_length: Optional[int] = Field(
        None, ge=1, description="Formats preference and prompt: keep the last N tokens of a longer prompt (None: "
                                "all of it; format prompt: at most data.max_length); the rows cut are counted.")
    system_prompt: Optional[str] = Field(
        None, description="Format prompt: a system message put before every prompt (a string prompt becomes "
                          "[system, user] messages), rendered with the chat template and its generation prompt.")
    chat_turns: Literal["all", "last"] = Field(
        "all", description="Chat rows: all (one row per conversation, every reply a target) | last (one row per "
                           "assistant turn, trained on that turn only; for templates that rewrite earlier replies).")
    cache_dir: Optional[str] = Field(
        None, description="Tokenized-data cache; default $DS_FINETUNE_CACHE or ~/.cache/ds-finetune.")
    num_proc: Optional[int] = Field(
        None, ge=1, le=1024, description="Worker processes that tokenize the data (default: all cores).")

    # Set by the run config, not by users: preference rows trained one by one (train.objective kto on pairs).
    _pairs_as_rows: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.path is None) == (self.sources is None):
            raise ValueError("set exactly one of data.path or data.sources")
        if self.sources is not None:
            unique_names("data.sources", self.sources)
        for source in self.sources or []:
            check_layout_fits_format(source.layout or self.layout, source.format or self.format)
        if self.sources is None:
            check_layout_fits_format(self.layout, self.format)
        return self

    @property
    def is_mixture(self) -> bool:
        return self.sources is not None

    @property
    def pairs_as_rows(self) -> bool:
        """Preference pairs are read as unpaired rows, chosen desirable, rejected not (KTO; TRL's
        unpair_preference_dataset)."""
        return self._pairs_as_rows

    @property
    def formats(self) -> set[str]:
        """The format of data.path, or of every source of data.sources."""
        return {s.format or self.format for s in self.sources} if self.is_mixture else {self.format}

    def source_configs(self) -> list[tuple[str, float, "DataConfig"]]:
        """(name, weight, the source as a one-file data config) of each source of a mixture."""
        return [(s.name, s.weight, self.one_source(s)) for s in self.sources]

    def one_source(self, source: EvalSourceConfig) -> "DataConfig":
        """A source of data.sources or eval.sources as a one-file data config (the rest from this section)."""
        return self.model_copy(update={"path": source.path, "sources": None, **{
            k: getattr(source, k) for k in SOURCE_FIELDS + SOURCE_FIELDS_ADDED if getattr(source, k) is not None}})

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_bools(cls, value):
        # `packing: true` meant "pack" before packs were isolated; it now means the isolated kind.
        return {True: "isolated", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @property
    def packs(self) -> bool:
        return self.packing != "none"

    @property
    def isolates(self) -> bool:
        """Packed rows attend only to themselves (position ids restart at every row)."""
        return self.packing == "isolated"

    def settings(self, exclude: set) -> dict:
        """The settings as JSON values, less `exclude`; a setting added after caches and checkpoints existed
        is left out at its default (which computes what they did), so those still match."""
        values = self.model_dump(mode="json", exclude=exclude)
        if values.get("chat_template") is not None:  # the template's text is what counts, not where it lies
            values["chat_template"] = f"sha256:{chat_template_sha256(values['chat_template'])}"
        return {k: v for k, v in values.items() if k not in _ADDED_AT_DEFAULT or v != _ADDED_AT_DEFAULT[k]}


# data.chat_template: a value holding `{{` or `{%` is a template, anything else a file path; its identity (cache
# key, fingerprint) is the text, so an edited file is a changed setting and a moved one is not.

def is_template_text(value: str) -> bool:
    return "{{" in value or "{%" in value


def chat_template_text(value: str) -> str:
    """The template itself, read from the file a path names."""
    if is_template_text(value):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config error: data.chat_template: cannot read {path} ({type(e).__name__}); give a Jinja "
                        f"file or the template itself (a string holding {{% or {{{{)") from None


def chat_template_sha256(value: str) -> str:
    return hashlib.sha256(chat_template_text(value).encode()).hexdigest()
