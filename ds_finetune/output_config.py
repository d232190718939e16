"""The run config's sections about what a run writes besides its weights (config.py holds them in the run
config): `eval` (held-out losses), `checkpoint` (when and how checkpoints are saved and kept) and `logging`
(progress bar, TensorBoard, W&B)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ds_finetune.config_text import Section
from ds_finetune.data_config import EvalSourceConfig, unique_names


class EvalConfig(Section):
    path: Optional[str] = Field(None, description="Held-out data (file/folder/dataset, same format as data.path).")
    fraction: float = Field(0.0, ge=0, lt=1, description="Or hold out this share of data.path (chosen from the "
                                                         "seed, never trained on).")
    every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    max_batches: int = Field(0, ge=0, description="Eval batches per rank (0: the whole eval set).")
    micro_batch_size: Optional[int] = Field(None, ge=1, description="Eval sequences per rank per batch; "
                                                                     "default train.micro_batch_size.")
    sources: Optional[list[EvalSourceConfig]] = Field(
        None, description="Or named held-out sources, {path, name, format and its fields, split} each (data.sources "
                          "without weight): eval_loss/NAME per source beside eval_loss; max_batches is per source.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is not None) + (self.sources is not None) + (self.fraction > 0) > 1:
            raise ValueError("set one of eval.path, eval.sources or eval.fraction, not several")
        if self.sources is not None:
            unique_names("eval.sources", self.sources)
        return self

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.sources is not None or self.fraction > 0


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, description="Save every N optimizer steps (0: off).")
    every_minutes: float = Field(0.0, ge=0, description="Also save when this many minutes passed since the last save (0: off).")
    keep_last: int = Field(3, ge=0, description="Keep the newest K complete checkpoints (0: keep all).")
    dir: Optional[str] = Field(None, description="Checkpoint folder; default OUTPUT_DIR/checkpoints.")
    save_on_signal: bool = Field(True, description="On SIGTERM/SIGINT finish the step, save, exit.")
    save_final: bool = Field(True, description="Save when training ends.")
    verify_hashes: bool = Field(True, description="sha256-check files before loading (sizes are always checked).")
    export_final: bool = Field(False, description="At the end, export a Hugging Face model to OUTPUT_DIR/final_model.")
    keep_best: bool = Field(False, description="Keep the checkpoint with the lowest eval loss out of keep_last.")
    async_save: bool = Field(
        False, description="Write checkpoints from a host-memory copy in a background thread while training "
                           "continues (host memory: one save of this rank's state; on GPUs page-locked once and "
                           "reused, at most an eighth of the node's memory).")

    @field_validator("dir")
    @classmethod
    def _names_a_folder(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # "" would be the current folder
            raise ValueError("must name a folder; remove it for OUTPUT_DIR/checkpoints")
        return value


class WandbConfig(Section):
    project: str = Field(..., description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B entity (team or user); default: yours.")
    name: Optional[str] = Field(None, description="W&B run name; default: W&B's.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="online | offline | disabled.")


class LoggingConfig(Section):
    progress_bar: bool = Field(True, description="Show a progress bar on rank 0.")
    tensorboard: bool = Field(True, description="Write TensorBoard scalars to OUTPUT_DIR/tensorboard.")
    sample_ids: bool = Field(False, description="Write each step's dataset row ids to metrics.jsonl.")
    wandb: Optional[WandbConfig] = Field(
        None, description="Log to Weights & Biases from rank 0 (needs the `wandb` extra); one W&B run across resumes.")
