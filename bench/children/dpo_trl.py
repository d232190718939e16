"""TRL's DPOTrainer, the contender of `bench/dpo_trl.py`, in one process on the CPU.

It reads a ds-finetune DPO run config so both sides do the same work: the same inline model (built from the
same seed), the same pairs file (TRL tokenizes it itself with the same tokenizer and max_length; a string
prompt gets the bos token ds-finetune starts it with, so both train the same tokens), the same
micro batch (pairs), grad accumulation, optimizer settings (torch AdamW), LR schedule, beta and loss type,
fp32 (TRL defaults to bf16 autocast), and the reference log-probs precomputed before training
(`precompute_ref_log_probs=True`, no reference model kept). With --deepspeed, the DeepSpeed config
ds-finetune generates for the run is handed to the Trainer.

Appends one JSON line per optimizer step to --steps-log: {"step", "loss", "time", "tokens"} (time at the
step's end, as ds-finetune's metrics.jsonl; tokens: TRL's num_tokens, the input tokens trained so far, as
metrics.jsonl's). With --phases, the time of each micro-step's phases goes there (bench/children/dpo_trl_phases.py).

    python bench/children/dpo_trl.py --config RUN.yaml --out DIR --steps-log steps.jsonl [--deepspeed]
                                  [--phases phases.jsonl]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)
from dpo_trl_phases import Clock, time_trl  # noqa: E402
from side_by_side import loss_log, random_model, trainer_settings  # noqa: E402  (this folder's: HF Trainer's child)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="ds-finetune DPO run config to mirror")
    p.add_argument("--out", required=True, help="Trainer output_dir")
    p.add_argument("--steps-log", required=True, help="per-step JSONL")
    p.add_argument("--deepspeed", action="store_true", help="hand the run's DeepSpeed config to the Trainer")
    p.add_argument("--phases", default=None,
                   help="JSONL of each micro-step's phase times (bench/children/dpo_trl_phases.py)")
    return p.parse_args()


def main():
    args = parse_args()
    import trl
    from datasets import Dataset

    from ds_finetune.config import load_config
    from ds_finetune.data import load_tokenizer
    from ds_finetune.zero import zero_config_for_run

    cfg = load_config(args.config, [])
    micro, accum, _ = cfg.batch_layout(1)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines() if line.strip()]
    if tokenizer.bos_token is not None and tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id:
        # ds-finetune starts a string prompt with bos (data/preference.py); TRL tokenizes it as given
        rows = [dict(r, prompt=tokenizer.bos_token + r["prompt"]) for r in rows]
    model = random_model(cfg)
    dpo_args = trl.DPOConfig(
        output_dir=args.out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=cfg.train.max_steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss_type], label_smoothing=cfg.dpo.label_smoothing,
        max_length=cfg.data.max_length, precompute_ref_log_probs=True,
        deepspeed=zero_config_for_run(cfg, 1) if args.deepspeed else None, **trainer_settings(cfg))
    trainer = trl.DPOTrainer(model=model, args=dpo_args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), callbacks=[loss_log(args.steps_log)()])
    done = time_trl(Clock(args.phases), trainer) if args.phases else lambda: None
    trainer.train()
    done()


if __name__ == "__main__":
    main()
