"""TRL's ORPOTrainer (`trl.experimental.orpo`), the contender of `bench/orpo_trl.py`, in one process on the CPU.

It reads a ds-finetune ORPO run config so both sides do the same work: the same inline model (built from the
same seed), the same pairs file (ORPOTrainer tokenizes it itself with the same tokenizer and max_length, adding
bos before the prompt and eos after each completion as ds-finetune does), the same micro batch (pairs), grad
accumulation, optimizer settings (torch AdamW), LR schedule and beta, fp32 (no autocast).

Appends one JSON line per optimizer step to --steps-log: {"step", "loss", "time"} (time at the step's end).

    python bench/children/orpo_trl.py --config RUN.yaml --out DIR --steps-log steps.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)
from side_by_side import loss_log, random_model, trainer_settings  # noqa: E402  (this folder's: HF Trainer's child)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="ds-finetune ORPO run config to mirror")
    p.add_argument("--out", required=True, help="Trainer output_dir")
    p.add_argument("--steps-log", required=True, help="per-step JSONL")
    args = p.parse_args()
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from ds_finetune.config import load_config
    from ds_finetune.data import load_tokenizer

    cfg = load_config(args.config, [])
    micro, accum, _ = cfg.batch_layout(1)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines() if line.strip()]
    orpo_args = ORPOConfig(
        output_dir=args.out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=cfg.train.max_steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        beta=cfg.orpo.beta, max_length=cfg.data.max_length,
        **trainer_settings(cfg))
    trainer = ORPOTrainer(model=random_model(cfg), args=orpo_args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows), callbacks=[loss_log(args.steps_log)()])
    trainer.train()


if __name__ == "__main__":
    main()
