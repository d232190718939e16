"""Run config: the pydantic schema (one model per YAML section; `data` is data_config.py, `model.lora`
lora_config.py, the objectives' sections objective_config.py, `eval`, `checkpoint` and `logging`
output_config.py) and loading a config through it (the
YAML, overrides, error format and field reference are config_text.py; the resume fingerprint is fingerprint.py).

Every field carries a one-line description; `ds-finetune config show-schema` prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ds_finetune.config_text import Section, apply_overrides, field_lines, format_validation_error, load_raw_yaml
from ds_finetune.data_config import DataConfig
from ds_finetune.errors import UserError
from ds_finetune.lora_config import LoraConfig
from ds_finetune.output_config import CheckpointConfig, EvalConfig, LoggingConfig, WandbConfig  # noqa: F401
from ds_finetune.optim import OPTIMIZERS, SCHEDULES, check_train_settings
from ds_finetune.objective_config import (PAIR_OBJECTIVES, REFERENCE_OBJECTIVES, CpoConfig, DpoConfig,  # noqa: F401
                                          GrpoConfig, KtoConfig, OrpoConfig, RewardConfig, RewardFunctionConfig,
                                          SimpoConfig)


class ModelConfig(Section):
    name_or_path: Optional[str] = Field(
        None, description="Hugging Face model name or local folder to load weights from (or use `config`).")
    config: Optional[dict[str, Any]] = Field(
        None, description="Inline HF model config (needs `model_type`) for a randomly initialised model.")
    tokenizer: Optional[str] = Field(
        None, description="Tokenizer name or folder; defaults to `name_or_path`.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                          "flex_attention"]] = Field(
        None, description="Attention kernels (transformers' `attn_implementation`); unset: transformers' default "
                          "(sdpa where the model supports it). Flash attention needs model.dtype bf16 or fp16.")
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of name_or_path, for the model, its config and its "
                          "tokenizer.")
    trust_remote_code: bool = Field(
        False, description="Run the modeling and tokenizer code a Hub model ships (only for models you trust).")
    lora: Optional[LoraConfig] = Field(
        None, description="Train LoRA adapters on a frozen base (needs the `lora` extra, peft); checkpoints hold "
                          "only the adapters.")
    quantization: Optional[Literal["4bit", "8bit"]] = Field(
        None, description="QLoRA: load the frozen base quantised by bitsandbytes (4bit: NF4, double quantisation, "
                          "computing and stored in model.dtype; 8bit: LLM.int8, ZeRO 0-2); needs model.lora.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path or model.config")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ValueError("model.config needs a `model_type` (e.g. llama)")
        if self.tokenizer is None and self.name_or_path is None:
            raise ValueError("model.tokenizer is required when the model comes from an inline model.config")
        inline = (self.config or {}).get("attn_implementation")
        if self.attn_implementation and inline and inline != self.attn_implementation:
            raise ValueError(f"model.attn_implementation ({self.attn_implementation}) and model.config."
                             f"attn_implementation ({inline}) disagree; set only model.attn_implementation")
        if self.quantization is not None:
            if self.lora is None:
                raise ValueError(f"model.quantization {self.quantization} trains LoRA adapters on the quantised base: "
                                 f"set model.lora (e.g. model.lora.r=16)")
            if self.name_or_path is None:
                raise ValueError("model.quantization quantises pretrained weights: set model.name_or_path, not "
                                 "model.config")
        if self.attention.startswith("flash") and self.dtype == "fp32":
            raise ValueError(f"model.attn_implementation: {self.attention} has no fp32 kernels (it fails at the first "
                             "forward); set model.dtype: bf16 (or fp16), or use sdpa")
        return self

    def hub_options(self, for_tokenizer: bool = False) -> dict:
        """from_pretrained's keyword arguments for the revision and remote code, only those set. The revision
        is name_or_path's: a tokenizer named apart (model.tokenizer) is loaded at its default revision."""
        own_tokenizer = for_tokenizer and self.tokenizer not in (None, self.name_or_path)
        return {**({"revision": self.revision} if self.revision and not own_tokenizer else {}),
                **({"trust_remote_code": True} if self.trust_remote_code else {})}

    @property
    def attention(self) -> str:
        """The attention implementation the config asks for ("" where it leaves transformers' default)."""
        inline = self.config or {}
        return str(self.attn_implementation or inline.get("attn_implementation")
                   or inline.get("_attn_implementation") or "")


class TrainConfig(Section):
    micro_batch_size: int = Field(1, ge=1, description="Sequences per rank per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step (derived if global_batch_size is set).")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="Sequences per optimizer step over all ranks; fixes grad_accum for any world size.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    epochs: Optional[int] = Field(None, ge=1, description="Stop after this many epochs (with max_steps: whichever first).")
    lr: float = Field(1e-4, gt=0, le=10, description="Peak learning rate.")
    lr_schedule: Literal[SCHEDULES] = Field(
        "cosine", description="Decay after warmup: cosine | linear | constant (ds-finetune's: the first warmup step "
                              "at lr/warmup, decay to min_lr_ratio), or any other transformers.get_scheduler name "
                              "(cosine_with_min_lr, warmup_stable_decay, constant_with_warmup, polynomial, "
                              "inverse_sqrt, cosine_with_restarts, cosine_warmup_with_min_lr) with HF's numbers.")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Arguments of a transformers schedule, as the HF Trainer's (e.g. "
                                          "min_lr_rate for cosine_with_min_lr, num_decay_steps for "
                                          "warmup_stable_decay).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Or warm up over this share of the run's steps "
                                                             "(rounded up, as the HF Trainer).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr (cosine/linear).")
    optimizer: Literal[OPTIMIZERS] = Field(
        "adamw", description="adamw | adamw_fused | lion | adafactor (ZeRO 0) | adamw_8bit (bitsandbytes); "
                             "DeepSpeed's kernels on GPUs and its CPU Adam/Lion under optimizer offload.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (matrices only).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (Lion's first beta).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (Lion's second beta).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 disables).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0, 1, 2 or 3.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Offload optimizer state (ZeRO 1-3).")
    offload_param: Literal["none", "cpu"] = Field("none", description="Offload parameters (ZeRO 3 only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    tiled_mlp: bool = Field(
        False, description="Run each decoder layer's MLP over the sequence in tiles (DeepSpeed's TiledMLP, as ALST): "
                           "its intermediate activations exist one tile at a time; backward recomputes each tile.")
    loss_chunk_tokens: int = Field(
        256, ge=0, description="Target tokens per chunk of LM head + cross-entropy (logits never held for all "
                               "tokens); 0 computes the full logits.")
    sequence_parallel: int = Field(
        1, ge=1, le=1024, description="Ranks that share one sequence, each holding a slice of its length (DeepSpeed "
                                      "Ulysses); divides the world size, whose quotient is the data-parallel size.")
    seed: int = Field(1234, ge=0, lt=2**32, description="Seed for init, data order and dropout.")
    objective: Literal["sft", "dpo", "orpo", "simpo", "cpo", "kto", "reward", "grpo"] = Field(
        "sft", description="sft (next-token loss on the targets) | dpo | orpo | simpo | cpo | reward (preference "
                           "pairs, data.format preference) | kto (data.format unpaired_preference) | grpo (online RL "
                           "on sampled completions, data.format prompt; with rewards); each has its section of "
                           "settings: dpo, orpo, simpo, cpo, kto, reward, grpo.")
    deterministic: bool = Field(
        True, description="On CUDA: deterministic kernels (torch.use_deterministic_algorithms, a fixed cuBLAS "
                          "workspace), so a resumed run is bitwise the uninterrupted one; costs some speed. "
                          "CPU runs are deterministic either way.")

    @model_validator(mode="after")
    def _check(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs (or both)")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("train.offload_param needs train.zero_stage=3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.micro_batch_size}")
        check_train_settings(self)
        return self

    @field_validator("lr_scheduler_kwargs")
    @classmethod
    def _json_kwargs(cls, value):
        try:  # recorded in the resume fingerprint, which is JSON
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("must hold plain values (numbers, strings, true/false)") from None
        return value


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)
    cpo: CpoConfig = Field(default_factory=CpoConfig)
    kto: KtoConfig = Field(default_factory=KtoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    rewards: list[RewardFunctionConfig] = Field(
        default_factory=list, description="train.objective grpo: the reward functions, {name, function, weight} each; "
                                          "the reward is their weighted sum.")
    output_dir: str = Field(..., description="Run folder: metrics, configs, checkpoints.")
    deepspeed: Optional[dict[str, Any]] = Field(
        None, description="DeepSpeed config keys merged over the generated config (NVMe offload, ZeRO++, MiCS, "
                          "comms_logger, aio); keys ds-finetune sets may only repeat its value (docs/config.md).")

    @field_validator("deepspeed")
    @classmethod
    def _json_values(cls, value):
        # It is handed to DeepSpeed and printed as JSON by --dry-run: a YAML date or a nan has no JSON form.
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ValueError("must hold JSON values only (strings, finite numbers, true/false, null, lists, "
                             "mappings)") from None
        return value

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value: str) -> str:
        # Path("") is the current folder: an empty output_dir=override would train (and delete checkpoints) there.
        if not value.strip():
            raise ValueError("must name the run folder, e.g. output_dir=runs/my-run")
        return value

    @model_validator(mode="after")
    def _quantised_base_fits_zero(self):
        if self.model.quantization == "8bit" and self.train.zero_stage == 3:
            raise ValueError("model.quantization 8bit is not supported with train.zero_stage 3 (ZeRO-3 partitions "
                             "float tensors only); use 4bit, or train.zero_stage 2")
        return self

    @model_validator(mode="after")
    def _eval_of_a_mixture(self):
        if self.data.is_mixture and self.eval.fraction > 0:
            raise ValueError("set eval.path or eval.sources, not eval.fraction, with data.sources (a held-out share "
                             "of a mixture is not supported yet)")
        return self

    @model_validator(mode="after")
    def _objective_fits_the_data(self):
        name, formats = self.train.objective, self.data.formats
        wanted = {"kto": "unpaired_preference", **{p: "preference" for p in PAIR_OBJECTIVES}}.get(name)
        takes = {wanted, "preference"} if name == "kto" else {wanted}  # KTO unpairs pairs, as TRL's KTOTrainer
        if wanted and not formats <= takes:
            raise ValueError(f"train.objective {name} needs data.format {' or '.join(sorted(takes))} (got "
                             f"{', '.join(sorted(formats))})")
        self.data._pairs_as_rows = name == "kto"
        if "preference" in formats and not wanted:
            raise ValueError(f"data.format preference needs a pair objective: train.objective in "
                             f"{list(PAIR_OBJECTIVES)}")
        if "unpaired_preference" in formats and name != "kto":
            raise ValueError("data.format unpaired_preference needs train.objective kto")
        if wanted and self.data.packs:
            self._pairs_pack(name)
        eval_formats = {s.format or self.data.format for s in self.eval.sources or []}
        if wanted and eval_formats - takes:
            raise ValueError(f"eval.sources of train.objective {name} need format {' or '.join(sorted(takes))} (got "
                             f"{', '.join(sorted(eval_formats - takes))})")
        if name in REFERENCE_OBJECTIVES and getattr(self, name).reference == "model" and self.model.lora is not None:
            raise ValueError(f"{name}.reference model is for full fine-tuning; with model.lora the reference is the "
                             f"base with its adapters off: remove {name}.reference")
        if name == "kto" and self.kto.loss_type == "kto" and self.train.micro_batch_size < 2:
            raise ValueError("train.objective kto needs train.micro_batch_size >= 2: its KL estimate pairs each prompt "
                             "with another completion of the same block of micro_batch_size rows (as TRL's "
                             "KTOTrainer); raise it, or set kto.loss_type apo_zero_unpaired (no KL estimate)")
        self._grpo_fits()
        if self.data.system_prompt is not None and self.data.formats != {"prompt"}:
            raise ValueError("data.system_prompt is a setting of data.format prompt (GRPO's prompts); put a system "
                             "message in the rows of other formats, or remove it")
        if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
            raise ValueError(f"data.max_prompt_length ({self.data.max_prompt_length}) must be below "
                             f"data.max_length ({self.data.max_length})")
        return self

    def _pairs_pack(self, name: str) -> None:
        """Packing of preference rows: each sequence attends only to itself (isolated), for every preference
        objective (each needs only per-sequence values)."""
        if name == "reward" and self.train.sequence_parallel > 1:
            raise ValueError("data.packing with train.sequence_parallel > 1 is not supported with train.objective "
                             "reward (a packed sequence's last token, where it is scored, is not found in a slice "
                             "yet); set data.packing=false")
        if not self.data.isolates:
            raise ValueError(f"data.packing shared would let the sequences of a pack attend to each other (a pair's "
                             f"chosen and rejected, KTO's rows); use data.packing=isolated with train.objective {name}")

    def _grpo_fits(self) -> None:
        name = self.train.objective
        if "prompt" in self.data.formats and name != "grpo":
            raise ValueError(f"data.format prompt is for train.objective grpo (it has prompts, no completions to train "
                             f"{name} on); set train.objective=grpo or use another data.format")
        if name != "grpo":
            if self.rewards:
                raise ValueError("rewards is a setting of train.objective grpo; remove it or set train.objective=grpo")
            return
        formats = self.data.formats
        if formats != {"prompt"}:
            raise ValueError(f"train.objective grpo needs data.format prompt (got {', '.join(sorted(formats))})")
        if not self.rewards:
            raise ValueError("train.objective grpo needs rewards: a list of {name, function, weight}, e.g. "
                             "[{function: accuracy}, {function: format}]")
        names = [r.name for r in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"rewards: two rewards are named {max(names, key=names.count)!r}; give each a unique name")
        if self.data.packs:
            raise ValueError("data.packing is not supported with train.objective grpo; set data.packing=false")
        if self.train.sequence_parallel > 1:
            raise ValueError("train.sequence_parallel > 1 is not supported with train.objective grpo yet; set "
                             "train.sequence_parallel=1")
        if self.eval.enabled:
            raise ValueError("evaluation is not supported with train.objective grpo yet; remove eval.path, "
                             "eval.sources and eval.fraction")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that take different sequences: the world size over train.sequence_parallel, or a UserError."""
        sp = self.train.sequence_parallel
        if world_size % sp:
            fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise UserError(f"config error: train.sequence_parallel={sp} does not divide the world size {world_size}; "
                            f"use a world size that is a multiple of {sp}, or train.sequence_parallel in {fits[:12]}")
        return world_size // sp

    def batch_layout(self, world_size: int, keep_global_batch: int | None = None) -> tuple[int, int, int]:
        """(micro_batch_size, grad_accum, global_batch) for this world size, or a UserError. Under sequence
        parallelism the sequences of a step are shared out over the data-parallel size (world / SP).

        `keep_global_batch` (the global batch of a checkpoint being resumed) wins over grad_accum when
        train.global_batch_size is unset: resuming on another world size recomputes grad_accum so the
        global batch, and with it the data order and the loss, stay the same (docs/design.md)."""
        t, sp = self.train, self.train.sequence_parallel
        dp = self.data_parallel_size(world_size)
        target = t.global_batch_size
        if target is None and keep_global_batch is not None \
                and keep_global_batch != t.micro_batch_size * t.grad_accum * dp:
            target = keep_global_batch
        if target is None:
            return t.micro_batch_size, t.grad_accum, t.micro_batch_size * t.grad_accum * dp
        per_step = t.micro_batch_size * dp
        if target % per_step:
            key = "train.global_batch_size" if t.global_batch_size else "the checkpoint's global batch"
            micro_ok = [m for m in range(1, target + 1) if target % (m * dp) == 0]
            world_ok = [w * sp for w in range(1, target + 1) if target % (t.micro_batch_size * w) == 0]
            micro_hint = f"train.micro_batch_size in {micro_ok[:12]} or " if micro_ok else ""
            ranks = f"world_size={t.micro_batch_size}×{world_size}" if sp == 1 else \
                f"data-parallel size={t.micro_batch_size}×{dp} (world {world_size} / sequence_parallel {sp})"
            raise UserError(f"config error: {key} {target} is not divisible by micro_batch_size×{ranks}; "
                            f"use {micro_hint}a world size in {world_ok[:12]}")
        return t.micro_batch_size, target // per_step, target

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading

def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return validate_config(apply_overrides(load_raw_yaml(path), list(overrides)))


def schema_lines() -> list[str]:
    """`section.key (default ...): description` for every field, for show-schema and the README."""
    return field_lines(RunConfig)
