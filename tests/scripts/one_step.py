"""One optimizer step of the tiny model on the first global batch, for each run spec given; writes the
step's loss and gradient norm and the updated full fp32 weights. Run as 1 process or under torchrun.

A spec is MICROxACCUM[:sSTAGE][:cCHUNK][:tied][:hHIDDEN][:m][:pSP] (defaults: ZeRO 2, the config's
loss_chunk_tokens, untied embeddings, the config's hidden size (h: heads keep size 16), untiled MLPs (m:
train.tiled_mlp), no sequence parallelism); outputs are named after the world size and the spec.
MICROxACCUM is per data-parallel rank (world / SP of them). One SP degree and one head geometry a process
(Ulysses registers once).

    python one_step.py OUT_DIR 4x1 2x2 1x4 4x1:s3:c0:tied        (world size 1)
    torchrun --nproc_per_node 2 one_step.py OUT_DIR 1x2
    torchrun --nproc_per_node 2 one_step.py OUT_DIR 4x1:s3:p2    (one sequence shared by 2 ranks)
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ds_finetune.data import EpochOrder, prepare_data  # noqa: E402
from ds_finetune.dist import init_distributed, seed_everything  # noqa: E402
from ds_finetune.ds_internals import gradient_averaging_ranks  # noqa: E402
from ds_finetune.loss import make_loss_fn  # noqa: E402
from ds_finetune.objective import train_step  # noqa: E402
from ds_finetune.model import build_engine, build_model  # noqa: E402
from ds_finetune.config import load_config  # noqa: E402
from ds_finetune.data import collate, load_tokenizer, unit_targets  # noqa: E402
from ds_finetune.sampler import BatchLayout  # noqa: E402
from ds_finetune.sequence import SequenceGroup, ShardedLoss, attach  # noqa: E402
from ds_finetune.zero import zero_config_for_run  # noqa: E402

out_dir, splits = Path(sys.argv[1]), sys.argv[2:]
rank, world, _ = init_distributed()
for split in splits:
    layout_text, *options = split.split(":")
    micro, accum = map(int, layout_text.split("x"))
    extra = [f"train.zero_stage={o[1:]}" for o in options if o.startswith("s")]
    extra += [f"train.loss_chunk_tokens={o[1:]}" for o in options if o.startswith("c")]
    extra += ["model.config.tie_word_embeddings=true" for o in options if o == "tied"]
    extra += [f"train.sequence_parallel={o[1:]}" for o in options if o.startswith("p")]
    # the heads keep the config's size (16), so one process's Ulysses geometry fits every hidden size
    extra += [x for o in options if o.startswith("h") for x in (f"model.config.hidden_size={o[1:]}",
                                                                "model.config.head_dim=16")]
    extra += ["train.tiled_mlp=true" for o in options if o == "m"]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                      [f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", "train.zero_stage=2", *extra,
                       "train.max_steps=1", "train.warmup_steps=0", "train.lr_schedule=constant",
                       # Adam's first update is lr * g / (|g| + eps): with the default eps a gradient near 0 that
                       # differs by float noise moves its weight by up to ±lr; eps 1e-5 keeps the update
                       # proportional to such gradients, so equal weights mean equal gradients.
                       "train.adam_eps=1e-5",
                       f"output_dir={out_dir}"])
    ds_config = zero_config_for_run(cfg, world)
    tok = load_tokenizer(cfg.model.tokenizer)
    data = prepare_data(cfg.data, tok)
    order = EpochOrder(data, cfg.train.seed, False, cfg.data.max_length)
    group = SequenceGroup.of(cfg.train.sequence_parallel, world, rank)
    layout = BatchLayout(micro, accum, group.dp_size)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, ds_config)
    loss_fn = make_loss_fn(model, cfg.train.loss_chunk_tokens)
    mpu = None
    if group.size > 1:
        mpu, ulysses = attach(model, group.size, micro)
        loss_fn = ShardedLoss(loss_fn, group, ulysses, 2)
    engine = build_engine(model, cfg, ds_config, 1, mpu=mpu)
    units = order.units(0)
    targets = unit_targets(data, units[:layout.global_batch])
    batches = [collate(data, units[layout.micro_slice(0, m, group.dp_rank)], 2) for m in range(accum)]
    def full_fp32(p):  # ZeRO 0 has no fp32 master copy apart from the (fp32) parameter itself
        return (safe_get_full_fp32_param(p) if cfg.train.zero_stage > 0 else p).detach().clone().contiguous()

    initial = {n: full_fp32(p) for n, p in engine.module.named_parameters()}
    grad = {}

    def gradient_norm():  # the reduced, unclipped gradient (Adam's update hides its scale; the norm does not)
        squares = sum(safe_get_full_grad(p).double().square().sum() for p in engine.module.parameters())
        grad["norm"] = squares.sqrt().item()

    local, _ = train_step(engine, loss_fn, batches, targets, accum, gradient_averaging_ranks(engine),
                          before_update=gradient_norm)
    dist.all_reduce(local)
    weights = {n: full_fp32(p) for n, p in engine.module.named_parameters()}
    if rank == 0:
        save_file(weights, str(out_dir / f"w{world}-{split}.safetensors"))
        save_file(initial, str(out_dir / f"init{world}-{split}.safetensors"))
        (out_dir / f"loss{world}-{split}.json").write_text(json.dumps([float(local) / targets, grad["norm"]]))
    dist.barrier()
os._exit(0)
