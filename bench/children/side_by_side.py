"""The Hugging Face Trainer + DeepSpeed contender, run with torchrun like ds-finetune.

It reads a ds-finetune run config so both sides do the same work: the same inline model (same seed),
the same tokenized rows (ds-finetune's cache, wrapped as a map-style torch Dataset: HF's data path then
costs no more than a memory-mapped `datasets` table would), the same micro batch, grad accumulation,
optimizer settings, LR schedule and the DeepSpeed config ds-finetune generates (every value concrete).

Rank 0 appends one JSON line per optimizer step to --steps-log: {"step", "loss", "time"}; the loss is what
the Trainer logs (logging_steps=1: that step's loss, averaged over ranks), unrounded.
The optimizer is `adamw_torch`: the same torch.optim.AdamW implementation ds-finetune uses.

    torchrun --nproc_per_node 2 bench/children/side_by_side.py --config RUN.yaml --out DIR --steps-log steps.jsonl
             [--save-at 5,10] [--resume DIR/checkpoint-N]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="ds-finetune run config to mirror")
    p.add_argument("--out", required=True, help="Trainer output_dir (checkpoints)")
    p.add_argument("--steps-log", required=True, help="per-step JSONL written by rank 0")
    p.add_argument("--save-at", default="", help="comma-separated optimizer steps to checkpoint at")
    p.add_argument("--resume", default=None, help="checkpoint folder for resume_from_checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    return p.parse_args()


class RowsDataset:
    """ds-finetune's tokenized rows as a map-style dataset of {input_ids, labels} (labels -100 off-target)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return self.data.num_rows

    def __getitem__(self, i):
        ids, mask = self.data.row(i)
        return {"input_ids": ids, "mask": mask}


def make_collator(pad_id: int):
    import numpy as np
    import torch

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[j, :n] = r["input_ids"]
            labels[j, :n] = np.where(r["mask"], r["input_ids"], -100)
            attention[j, :n] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)}
    return collate


# ------------------------------------------------- what the HF Trainer and TRL's DPOTrainer baselines share

def trainer_settings(cfg) -> dict:
    """TrainingArguments that mirror a ds-finetune run: optimizer, LR schedule, clipping, seeds, activation
    recompute, a loss line every step (also TRL's configs, TrainingArguments whose gradient_checkpointing
    defaults to True in TRL 1.x: left at that, TRL would recompute every layer in backward where ours does not)."""
    t = cfg.train
    schedule = ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": t.min_lr_ratio}}
                if t.lr_schedule == "cosine" else {"lr_scheduler_type": t.lr_schedule})
    return dict(learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                adam_epsilon=t.adam_eps, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps, optim="adamw_torch",
                seed=t.seed, data_seed=t.seed, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                gradient_checkpointing=t.gradient_checkpointing, **schedule)


def random_model(cfg):
    """The run's inline model config, randomly initialised from its seed (as ds-finetune builds it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    set_seed(cfg.train.seed)
    inline = dict(cfg.model.config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline),
                                            dtype=torch.float32)


def loss_log(path: str | None):
    """A TrainerCallback writing {step, loss, time} per logged step to `path` (None: writes nothing), and
    "tokens" where the trainer logs num_tokens (TRL: the input tokens trained so far)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def __init__(self):
            self.file = open(path, "a") if path is not None else None

        def write(self, record: dict) -> None:
            if self.file is not None:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                tokens = {"tokens": logs["num_tokens"]} if "num_tokens" in logs else {}
                self.write({"step": state.global_step, "loss": logs["loss"], "time": time.time(), **tokens})

    return LossLog


def main():
    args = parse_args()
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from ds_finetune.config import load_config
    from ds_finetune.data import load_tokenizer, prepare_data
    from ds_finetune.dist import init_distributed
    from ds_finetune.zero import zero_config_for_run

    rank, world, _ = init_distributed()  # same backend and thread count as ds-finetune
    cfg = load_config(args.config, [])
    micro, accum, _ = cfg.batch_layout(world)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    save_at = {int(s) for s in args.save_at.split(",") if s}

    class StepLog(loss_log(args.steps_log if rank == 0 else None)):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in save_at:
                control.should_save = True
            return control

    model = random_model(cfg)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=args.max_steps or cfg.train.max_steps,
        # Saves happen only where StepLog asks (save_steps is out of reach).
        save_strategy="steps", save_steps=10**9,
        save_only_model=False, report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=False,  # our collator needs the "mask" field
        deepspeed=zero_config_for_run(cfg, world), ddp_backend="gloo",
        # Without use_cpu, accelerate finds no accelerator, calls the job non-distributed (world size 1)
        # and every rank trains on the whole dataset; with it: MULTI_CPU -> DeepSpeed, sharded as on GPUs.
        use_cpu=not torch.cuda.is_available(), **trainer_settings(cfg))
    trainer = Trainer(model=model, args=targs, train_dataset=RowsDataset(data),
                      data_collator=make_collator(cfg.model.config.get("pad_token_id", 0)), callbacks=[StepLog()])
    trainer.train(resume_from_checkpoint=args.resume)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
