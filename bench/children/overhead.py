"""The baseline of the loop-overhead figure: a bare DeepSpeed loop, run with torchrun like ds-finetune.

Same model (same seed), same DeepSpeed config (ds-finetune's own generator), same optimizer param
groups, same batches (the same tokenized cache, epoch order and collation, all collated before the
clock starts), the same loss - and nothing else: no metrics, no loss all-reduce, no checkpoint.
`--loss fused` computes the loss as ds-finetune does by default (its fused chunked cross-entropy,
`train.loss_chunk_tokens` of the config, divided by the micro-batch's targets); `--loss model` takes the
model's own loss (full logits), the pair of a ds-finetune run with `train.loss_chunk_tokens=0`.
Rank 0 writes the wall-clock time at the end of every optimizer step to --out as JSON.

    torchrun --nproc_per_node 2 bench/children/overhead.py --config RUN.yaml --steps N --loss fused --out times.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loss", choices=("fused", "model"), default="fused")
    args = p.parse_args()

    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_finetune.config import load_config
    from ds_finetune.data import collate, load_tokenizer, prepare_data
    from ds_finetune.sampler import BatchLayout, epoch_permutation
    from ds_finetune.dist import init_distributed, seed_everything
    from ds_finetune.loss import make_loss_fn
    from ds_finetune.zero import zero_config_for_run

    rank, world, _ = init_distributed()  # same backend and thread count as ds-finetune
    cfg = load_config(args.config, [])
    micro, accum, _ = cfg.batch_layout(world)
    layout = BatchLayout(micro, accum, world)
    ds_config = zero_config_for_run(cfg, world)

    # Pre-tokenized batches: every micro-batch of every step, as tensors, before anything is timed.
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    order = epoch_permutation(data.num_rows, cfg.train.seed, 0)
    units = [order[i:i + 1] for i in range(len(order))]
    pad_id = cfg.model.config.get("pad_token_id", 0)
    steps = []
    for s in range(args.steps):
        offset = s * layout.global_batch
        steps.append([collate(data, units[layout.micro_slice(offset, m, rank)], pad_id) for m in range(accum)])

    seed_everything(cfg.train.seed)
    inline = dict(cfg.model.config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline),
                                             dtype=torch.float32)
    # The same optimizer recipe as ds-finetune (decay / no-decay groups: ZeRO flattens and reduces each
    # group separately, so a one-group loop would do fewer collectives), so that only the loop differs.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))

    fused = make_loss_fn(model, cfg.train.loss_chunk_tokens) if args.loss == "fused" else None

    times = []
    for micro_batches in steps:
        for input_ids, attention_mask, labels, _, facts in micro_batches:
            input_ids, attention_mask = input_ids.to(engine.device), attention_mask.to(engine.device)
            if fused is None:
                loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels.to(engine.device)).loss
            else:  # the summed token loss over the micro-batch's targets (counted on the host: no device sync)
                targets = int((labels[:, 1:] != -100).sum())
                loss = fused(engine, input_ids, attention_mask, labels.to(engine.device), None, facts) / targets
            engine.backward(loss)
            engine.step()
        times.append(time.time())
    if rank == 0:
        Path(args.out).write_text(json.dumps({"times": times}))
    sys.stdout.flush()
    os._exit(0)  # like ds-finetune: skip DeepSpeed/gloo teardown, which can hang after the work is done


if __name__ == "__main__":
    main()
