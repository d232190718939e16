"""TRL's DPOTrainer, the contender of `bench/dpo_trl.py`, in one process on the CPU.

It reads a ds-finetune DPO run config so both sides do the same work: the same inline model (built from the
same seed), the same pairs file (TRL tokenizes it itself with the same tokenizer and max_length), the same
micro batch (pairs), grad accumulation, optimizer settings (torch AdamW), LR schedule, beta and loss type,
fp32 (TRL defaults to bf16 autocast), and the reference log-probs precomputed before training
(`precompute_ref_log_probs=True`, no reference model kept). With --deepspeed, the DeepSpeed config
ds-finetune generates for the run is handed to the Trainer.

Appends one JSON line per optimizer step to --steps-log: {"step", "loss", "time"} (time at the step's end,
as ds-finetune's metrics.jsonl).

    python bench/trl_dpo_train.py --config RUN.yaml --out DIR --steps-log steps.jsonl [--deepspeed]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="ds-finetune DPO run config to mirror")
    p.add_argument("--out", required=True, help="Trainer output_dir")
    p.add_argument("--steps-log", required=True, help="per-step JSONL")
    p.add_argument("--deepspeed", action="store_true", help="hand the run's DeepSpeed config to the Trainer")
    return p.parse_args()


def main():
    args = parse_args()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, set_seed

    from ds_finetune.config import load_config
    from ds_finetune.data import load_tokenizer
    from ds_finetune.zero import zero_config_for_run

    cfg = load_config(args.config, [])
    t = cfg.train
    micro, accum, _ = cfg.batch_layout(1)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines() if line.strip()]
    log = open(args.steps_log, "a")

    class StepLog(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.write(json.dumps({"step": state.global_step, "loss": logs["loss"], "time": time.time()}) + "\n")
                log.flush()

    set_seed(t.seed)
    inline = dict(cfg.model.config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline),
                                             dtype=torch.float32)
    schedule = ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": t.min_lr_ratio}}
                if t.lr_schedule == "cosine" else {"lr_scheduler_type": t.lr_schedule})
    dpo_args = trl.DPOConfig(
        output_dir=args.out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=t.max_steps, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_epsilon=t.adam_eps, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps,
        optim="adamw_torch", seed=t.seed, data_seed=t.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, bf16=False, beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type], label_smoothing=cfg.dpo.label_smoothing, max_length=cfg.data.max_length,
        precompute_ref_log_probs=True, deepspeed=zero_config_for_run(cfg, 1) if args.deepspeed else None,
        **schedule)
    trainer = trl.DPOTrainer(model=model, args=dpo_args, processing_class=load_tokenizer(cfg.model.tokenizer),
                             train_dataset=Dataset.from_list(rows), callbacks=[StepLog()])
    trainer.train()
    log.close()


if __name__ == "__main__":
    main()
