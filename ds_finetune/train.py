"""Training: setup (distributed, config, data, model, engine, resume) -> fit (the loop).

Runs in every process the `deepspeed` launcher (or torchrun) starts. The loop reads top to bottom:
take the step's global batch from the epoch order, run the micro-steps, log, maybe save, maybe stop.
Everything a restart needs is in `TrainState` plus each rank's RNG, saved in `client_state`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ds_finetune import checkpoint as ckpt
from ds_finetune import universal
from ds_finetune.config import RunConfig, changed_exact_keys, config_fingerprint, load_config, split_resume_arg
from ds_finetune.data import (DATA_FORMAT_VERSION, IGNORE_INDEX, TokenizedData, build_cache, cache_path, collate,
                              content_hash, load_tokenizer, plan_units, read_cache, resolve_data_files,
                              unit_targets, unit_tokens)
from ds_finetune.errors import UserError
from ds_finetune.export import export_checkpoint, write_hf_files
from ds_finetune.metrics import MetricsWriter, NullMetricsWriter
from ds_finetune.nodes import check_shared_checkpoint_dir
from ds_finetune.sampler import BatchLayout, epoch_permutation, steps_in_epoch
from ds_finetune.zero import zero_config_for_run


@dataclass
class TrainState:
    """Progress that must survive a restart (with the engine's own state and every rank's RNG)."""
    step: int = 0               # optimizer steps done
    epoch: int = 0
    offset: int = 0             # units of this epoch's order already consumed
    consumed_samples: int = 0
    tokens: int = 0


# ------------------------------------------------------------------------------------------ arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/train.py", description="ds-finetune training process")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest complete checkpoint, or from PATH")
    p.add_argument("--overwrite", action="store_true", help="start fresh even if checkpoints exist (deletes them)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if a setting that breaks exactness changed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    args.resume, args.overrides = split_resume_arg(args.resume, args.overrides)
    return args


# ------------------------------------------------------------------------------------ distributed setup

def init_distributed() -> tuple[int, int, int]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # A plain `python launch/train.py` is a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if get_accelerator().device_name() == "cpu":
        # One intra-op thread pool per rank sized to its share of the cores; fixed, so the float
        # reduction order (and the bitwise result) is the same in the reference and the resumed run.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    else:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def barrier():
    import torch.distributed as dist
    dist.barrier()


def on_rank0(fn, rank: int):
    """Run fn on rank 0 only; every rank returns its result, or raises its UserError (so no rank waits
    forever for a rank that failed)."""
    import torch.distributed as dist
    box = [None]
    if rank == 0:
        try:
            box[0] = fn()
        except UserError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


# ------------------------------------------------------------------------------------------------ RNG

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": list(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].astype(np.int64))
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ model/engine

def build_model(cfg: RunConfig, ds_config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    keep_alive = None
    if cfg.train.zero_stage == 3 and cfg.model.name_or_path is not None:
        # Lets transformers load pretrained weights inside deepspeed.zero.Init, so no rank ever holds the
        # full model (what an 8B ZeRO-3 run needs). Must stay referenced while the model is built.
        # Not for an inline random-init config: zero.Init draws the random init in another order, and
        # the same seed must give the same weights at every stage (SPEC §7).
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    try:
        if cfg.model.config is not None:
            inline = dict(cfg.model.config)
            model_config = AutoConfig.for_model(inline.pop("model_type"), **inline)
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        source = cfg.model.name_or_path or "model.config"
        raise UserError(f"model error: cannot build the model from {source} ({str(e).splitlines()[0][:200]})")
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    del keep_alive
    return model


def lr_lambda(cfg: RunConfig, total_steps: int):
    t = cfg.train

    def factor(step: int) -> float:  # `step` = optimizer steps already taken
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay
    return factor


def param_group_names(model) -> list[list[str]]:
    """Trainable parameter names of the two optimizer groups: decayed (matrices), not decayed (biases,
    norms). Saved with each checkpoint so a ZeRO-0 optimizer state can be mapped back to names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 or len(getattr(p, "ds_shape", ())) >= 2 else no_decay).append(name)
    return [decay, no_decay]


def build_engine(model, cfg: RunConfig, ds_config: dict, total_steps: int):
    import deepspeed

    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in param_group_names(model))
    t = cfg.train
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    schedule = lr_lambda(cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        # A callable, so the scheduler drives the optimizer DeepSpeed wraps; DeepSpeed saves and loads it.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


# ------------------------------------------------------------------------------------------------ data

def prepare_data(cfg: RunConfig, tok, local_rank: int) -> TokenizedData:
    files = resolve_data_files(cfg.data.path)
    data_hash = content_hash(files, cfg.data.path, cfg.data.split)
    path = cache_path(cfg.data, data_hash, tok)
    error = None
    if local_rank == 0 and not path.exists():
        try:
            build_cache(cfg.data, tok, files, data_hash, path)
        except UserError as e:
            error = e
    # Every rank learns about a data error, so none waits forever for a cache that will not come.
    import torch.distributed as dist
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error.message if error else None)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    return read_cache(path, data_hash)


class EpochOrder:
    """The units (rows or packs) of each epoch in order; planned once per epoch, O(1) to index after."""

    def __init__(self, data: TokenizedData, seed: int, packing: bool, max_length: int):
        self.data, self.seed, self.packing, self.max_length = data, seed, packing, max_length
        self._epoch, self._units = None, None

    def units(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            order = epoch_permutation(self.data.num_rows, self.seed, epoch)
            self._epoch, self._units = epoch, plan_units(self.data, order, self.packing, self.max_length)
        return self._units


def total_steps_of(cfg: RunConfig, order: EpochOrder, global_batch: int) -> int:
    t = cfg.train
    # Packing makes the steps of an epoch depend on its order, so count them epoch by epoch.
    per_epoch = [steps_in_epoch(len(order.units(e)), global_batch) for e in range(t.epochs or 1)]
    if min(per_epoch) == 0:
        raise UserError(f"data error: {cfg.data.path}: {order.data.num_rows} usable rows make fewer units than one "
                        f"global batch ({global_batch}); add data or lower the batch size")
    if t.epochs is None:
        return t.max_steps
    total = sum(per_epoch)
    return min(total, t.max_steps) if t.max_steps else total


# ------------------------------------------------------------------------------------------------ step

def token_loss_sum(engine, input_ids, attention_mask, labels) -> torch.Tensor:
    logits = engine(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def train_step(engine, micro_batches: list, global_targets: int, grad_accum: int, world_size: int,
               after_micro_step=None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss.

    SPEC §4a: the step's loss is (sum of token losses over the global batch) / (targets in the global batch).
    DeepSpeed divides each micro-step's loss by grad_accum and averages gradients over ranks, so each
    micro-step's sum is scaled by grad_accum * world_size / global_targets to cancel both."""
    scale = grad_accum * world_size / global_targets
    local_sum = torch.zeros((), dtype=torch.float64)
    for input_ids, attention_mask, labels in micro_batches:
        loss_sum = token_loss_sum(engine, input_ids.to(engine.device), attention_mask.to(engine.device),
                                  labels.to(engine.device))
        engine.backward(loss_sum * scale)
        engine.step()
        local_sum += loss_sum.detach().double().cpu()
        if after_micro_step is not None:
            after_micro_step()
    return local_sum


# ------------------------------------------------------------------------------------------------ stop

class StopSignal:
    """SIGTERM/SIGINT ask for a stop at the next step boundary; a second SIGINT exits at once (the commit
    protocol keeps every committed checkpoint valid whatever instant that lands on)."""

    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            os._exit(130)
        # A repeated SIGTERM (DeepSpeed's launcher passes ours on) keeps the first request.
        self.signum = self.signum or signum


# ------------------------------------------------------------------------------------------------ resume

def select_checkpoint(args, cfg: RunConfig, rank: int) -> ckpt.CheckpointInfo | None:
    """Rank 0 decides (it may hash many files); the others receive its decision."""
    return on_rank0(lambda: _select_checkpoint_rank0(args, cfg, cfg.checkpoint_dir), rank)


def _select_checkpoint_rank0(args, cfg: RunConfig, ckpt_dir: Path) -> ckpt.CheckpointInfo | None:
    hashes = cfg.checkpoint.verify_hashes
    if args.resume is None:
        if ckpt.has_checkpoints(ckpt_dir) and not args.overwrite:
            raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run or "
                            f"--overwrite to delete them and start over")
        return None
    if args.resume != "auto":
        path = Path(args.resume)
        if not path.is_dir():
            raise UserError(f"checkpoint error: {path}: no such checkpoint folder; see `ds-finetune ckpt list "
                            f"{cfg.output_dir}`")
        info = ckpt.inspect_checkpoint(path, hashes)
        if info.status != "complete":
            raise UserError(f"checkpoint error: {path} is {info.status} ({'; '.join(info.problems)[:300]}); "
                            f"pick another with `ds-finetune ckpt list {path.parent}`")
        return info
    info, skipped = ckpt.find_resumable_checkpoint(ckpt_dir, hashes)
    for line in skipped:
        print(f"[ds-finetune] {line}", flush=True)
    if info is None:
        print(f"[ds-finetune] no complete checkpoint in {ckpt_dir}: starting fresh", flush=True)
    return info


def check_resumable(info: ckpt.CheckpointInfo, fingerprint: dict, allow_change: bool) -> None:
    """Refuse, from the manifest alone (nothing unpickled yet), a checkpoint this run cannot continue."""
    state = info.manifest.get("trainer_state", {})
    if state.get("data_format_version") != DATA_FORMAT_VERSION:
        raise UserError(f"checkpoint error: {info.path} uses data format {state.get('data_format_version')}, this "
                        f"version uses {DATA_FORMAT_VERSION}; resume with the ds-finetune version that saved it")
    changed = changed_exact_keys(state.get("fingerprint", {}), fingerprint)
    if changed and not allow_change:
        raise UserError(f"config error: resuming {info.path} with changed {', '.join(changed)} would not continue "
                        f"the same run; restore them, or pass --allow-config-change to continue anyway")
    if changed:
        print(f"[ds-finetune] warning: continuing with changed {', '.join(changed)} (--allow-config-change)")


# ------------------------------------------------------------------------------------------------ main

def write_run_files(cfg: RunConfig, ds_config: dict) -> None:
    import json
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(cfg.to_yaml())
    (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def convert_for_resume(info: ckpt.CheckpointInfo, stage: int, world: int, rank: int):
    """Rank 0 converts the checkpoint to the stage-independent copy once; every rank then reads it."""
    m = info.manifest

    def convert_once():
        cached = universal.has_universal(info)
        print(f"[ds-finetune] converting {info.path} (ZeRO {m['zero_stage']}, {m['world_size']} ranks) for ZeRO "
              f"{stage} on {world} ranks" + (" (reusing the converted copy)" if cached else ""), flush=True)
        if not cached:
            universal.write_universal(info)

    on_rank0(convert_once, rank)
    return universal.read_universal(universal.universal_dir(info))


def resolve_layout(cfg: RunConfig, world: int, resume_from, is_main: bool) -> BatchLayout:
    saved_global_batch = resume_from.manifest["trainer_state"]["global_batch"] if resume_from else None
    micro, accum, global_batch = cfg.batch_layout(world, keep_global_batch=saved_global_batch)
    if is_main and (micro, accum) != cfg.batch_layout(world)[:2]:
        print(f"[ds-finetune] keeping the checkpoint's global batch {global_batch} on {world} ranks: "
              f"grad_accum={accum} (micro_batch_size={micro})", flush=True)
    return BatchLayout(micro, accum, world)


def restore(engine, resume_from: ckpt.CheckpointInfo, converted, rank: int) -> TrainState:
    """Engine state (natively, or from the converted copy), this rank's RNG, and the trainer's progress."""
    if converted is None:
        rng_states = ckpt.load_checkpoint(engine, resume_from)["rng_states"]
    else:
        universal.load_universal_optimizer(engine, *converted)
        rng_states = [universal.rng_from_plain(s) for s in converted[1]["rng_states"]]
    if rank < len(rng_states):  # a rank the saved run did not have keeps the seed + rank rule
        restore_rng(rng_states[rank])
    state = TrainState(**{k: resume_from.manifest["trainer_state"][k] for k in asdict(TrainState())})
    if rank == 0:
        print(f"[ds-finetune] resumed from {resume_from.path} at step {state.step} "
              f"(epoch {state.epoch}, offset {state.offset})", flush=True)
    return state


def run(args) -> int:
    rank, world, local_rank = init_distributed()
    cfg = load_config(args.config, args.overrides)
    is_main = rank == 0

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    data = prepare_data(cfg, tok, local_rank)
    if is_main and data.skipped_rows:
        print(f"[ds-finetune] skipped {data.skipped_rows} rows with no target tokens after masking/truncation")
    order = EpochOrder(data, cfg.train.seed, cfg.data.packing, cfg.data.max_length)

    check_shared_checkpoint_dir(cfg.checkpoint_dir, rank, world)
    resume_from = select_checkpoint(args, cfg, rank)
    layout = resolve_layout(cfg, world, resume_from, is_main)
    ds_config = zero_config_for_run(cfg, world, layout.micro_batch_size, layout.grad_accum)
    total_steps = total_steps_of(cfg, order, layout.global_batch)
    fingerprint = config_fingerprint(cfg, layout.global_batch, data.content_hash)
    if resume_from is not None:
        check_resumable(resume_from, fingerprint, args.allow_config_change)
    elif args.overwrite and is_main and cfg.checkpoint_dir.is_dir():
        for p in cfg.checkpoint_dir.iterdir():
            if ckpt.step_of_tag(p.name) is not None:
                ckpt.remove_tree(p)
    converted = None
    if resume_from is not None and (resume_from.manifest["zero_stage"], resume_from.manifest["world_size"]) \
            != (cfg.train.zero_stage, world):
        converted = convert_for_resume(resume_from, cfg.train.zero_stage, world, rank)
    barrier()

    seed_everything(cfg.train.seed)  # identical initial weights on every rank, stage and world size
    model = build_model(cfg, ds_config)
    if converted is not None:
        universal.load_universal_weights(model, converted[0]["weights"])
    engine = build_engine(model, cfg, ds_config, total_steps)
    # Dropout RNG: rank r draws from seed + r (documented in README; a new rank gets the same rule).
    seed_everything(cfg.train.seed + rank)

    state = TrainState() if resume_from is None else restore(engine, resume_from, converted, rank)
    if is_main:
        write_run_files(cfg, ds_config)
    barrier()

    metrics = (MetricsWriter(Path(cfg.output_dir), state.step, total_steps, cfg.logging.tensorboard,
                             cfg.logging.progress_bar) if is_main else NullMetricsWriter())
    stop = StopSignal()
    try:
        return fit(cfg, engine, tok, data, order, layout, state, total_steps, fingerprint, metrics, stop, rank)
    finally:
        metrics.close()


def fit(cfg, engine, tok, data, order, layout, state, total_steps, fingerprint, metrics, stop, rank) -> int:
    import torch.distributed as dist

    world, gb = layout.world_size, layout.global_batch
    pad_id = tok.pad_token_id  # any id works (padding is masked out of attention and loss); this one is valid
    last_save_time, saved_step = time.time(), state.step

    def save(reason: str) -> Path:
        nonlocal last_save_time, saved_step
        trainer_state = {**asdict(state), "seed": cfg.train.seed, "global_batch": gb,
                         "data_format_version": DATA_FORMAT_VERSION, "fingerprint": fingerprint}
        rng_states = [None] * world
        dist.all_gather_object(rng_states, capture_rng())
        path = ckpt.save_checkpoint(engine, cfg.checkpoint_dir, state.step,
                                    {"ds_finetune": trainer_state, "rng_states": rng_states,
                                     "param_group_names": param_group_names(engine.module)},
                                    trainer_state, cfg.checkpoint.keep_last, rank, world,
                                    write_extra=lambda tag_dir: write_hf_files(tag_dir, engine.module, tok))
        last_save_time, saved_step = time.time(), state.step
        metrics.message(f"[ds-finetune] saved {path} ({reason})")
        return path

    while state.step < total_steps:
        units = order.units(state.epoch)
        if len(units) < gb:  # possible only with packing, where each epoch packs differently
            raise UserError(f"data error: epoch {state.epoch} packs into {len(units)} sequences, fewer than one "
                            f"global batch ({gb}); add data or lower the batch size")
        if state.offset + gb > len(units):  # epoch done (a last partial batch is dropped)
            if cfg.train.epochs is not None and state.epoch + 1 >= cfg.train.epochs:
                break
            state.epoch, state.offset = state.epoch + 1, 0
            continue
        step_units = units[layout.step_slice(state.offset)]
        global_targets = unit_targets(data, step_units)
        micro_batches = [collate(data, units[layout.micro_slice(state.offset, m, rank)], pad_id)
                         for m in range(layout.grad_accum)]
        lr = engine.get_lr()[0]
        local_sum = train_step(engine, micro_batches, global_targets, layout.grad_accum, world,
                               after_micro_step=lambda: ckpt.fault_point("mid_accum", rank, state.step + 1))
        ckpt.fault_point("after_step", rank, state.step + 1)

        # One all-reduce carries the loss, the stop request and rank 0's "time to save" clock.
        want_time_save = (rank == 0 and cfg.checkpoint.every_minutes > 0
                          and time.time() - last_save_time >= 60 * cfg.checkpoint.every_minutes)
        flags = torch.tensor([float(local_sum), float(stop.signum), float(want_time_save)], dtype=torch.float64)
        dist.all_reduce(flags)
        state.offset += gb
        state.step += 1
        state.consumed_samples += gb
        step_tokens = unit_tokens(data, step_units)
        state.tokens += step_tokens

        record = {"step": state.step, "loss": float(flags[0]) / global_targets, "lr": lr, "epoch": state.epoch,
                  "consumed_samples": state.consumed_samples, "tokens": state.tokens, "time": time.time()}
        if cfg.logging.sample_ids:
            record["sample_ids"] = [int(x) for u in step_units for x in data.row_ids[u]]
        metrics.log(record, step_tokens)

        stopping = flags[1] > 0
        every = cfg.checkpoint.every_steps
        if stopping:
            if cfg.checkpoint.save_on_signal:
                path = save("stop requested")
                metrics.message(f"[ds-finetune] stopped by signal at step {state.step}; resume with --resume "
                                f"(checkpoint {path})")
            else:
                metrics.message(f"[ds-finetune] stopped by signal at step {state.step} without saving "
                                f"(checkpoint.save_on_signal=false)")
            return 128 + (signal.SIGTERM if stop.signum == 0 else stop.signum)
        if (every and state.step % every == 0) or flags[2] > 0:
            save("every_steps" if every and state.step % every == 0 else "every_minutes")

    if (cfg.checkpoint.save_final or cfg.checkpoint.export_final) and saved_step != state.step:
        save("final")
    if cfg.checkpoint.export_final:
        if rank == 0:
            out = export_checkpoint(cfg.checkpoint_dir / ckpt.tag_for_step(state.step),
                                    Path(cfg.output_dir) / "final_model", cfg.model.dtype)
            metrics.message(f"[ds-finetune] exported a Hugging Face model to {out}")
        dist.barrier()
    metrics.message(f"[ds-finetune] done: {state.step} steps; outputs in {cfg.output_dir}")
    return 0


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        code = run(args)
    except UserError as e:
        # Every rank reaches the same error; one line from rank 0 is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e.message}", file=sys.stderr, flush=True)
        code = e.exit_code
    sys.stdout.flush()
    # Skip interpreter teardown: DeepSpeed/gloo atexit hooks can hang or print noise after the work is done.
    os._exit(code)


if __name__ == "__main__":
    main()
