"""Training: `setup` (process group, config, data, resume choice, model, engine) -> `fit` (the loop).

Runs in every process the `deepspeed` launcher (or torchrun) starts. The loop reads top to bottom: take
the step's global batch from the epoch order, run the micro-steps, agree on the step's outcome, log,
maybe save, maybe stop. Everything a restart needs is the engine's state, every rank's RNG and
`TrainState`, saved by the `Checkpointer`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from deepspeed import DeepSpeedEngine

from ds_finetune import lora, messages, optim, quantization
from ds_finetune.checkpoint import resume
from ds_finetune.checkpoint.manager import Checkpointer
from ds_finetune.state import TrainState
from ds_finetune.config import RunConfig, load_config
from ds_finetune.config_text import split_resume_arg
from ds_finetune.data import (DATA_FORMAT_VERSION, EpochOrder, MixedData, MixtureOrder, RepeatedOrder, TokenizedData,
                              epoch_order, load_tokenizer, mix_change_message, prepare_training_data, unit_tokens)
from ds_finetune.dist import (barrier, decide, init_distributed, on_cuda, seed_everything, set_deterministic,
                              sum_over_ranks)
from ds_finetune.errors import UserError
from ds_finetune.evaluate import Evaluator, build_evaluator
from ds_finetune.faults import fault_point, unfired_fault
from ds_finetune.fingerprint import config_fingerprint
from ds_finetune.grad_norm import GradNorm
from ds_finetune.metrics import MetricsWriter, NullMetricsWriter, check_wandb_installed
from ds_finetune.model import build_engine, build_model, check_isolated_packing
from ds_finetune.nodes import check_shared_checkpoint_dir
from ds_finetune.rendezvous import Rendezvous, scratch_folder
from ds_finetune.sampler import BatchLayout
from ds_finetune.objectives import Objective, ObjectiveParts, StepResult, build_objective
from ds_finetune.sequence import SequenceGroup, attach
from ds_finetune.zero import zero_config_for_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/train.py", description="ds-finetune training process")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest complete checkpoint, or from PATH")
    p.add_argument("--overwrite", action="store_true", help="start fresh even if checkpoints exist (deletes them)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if a setting that breaks exactness changed")
    p.add_argument("--discard-newer", action="store_true",
                   help="with --resume PATH: move checkpoints newer than PATH aside and continue from PATH")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    args.resume, args.overrides = split_resume_arg(args.resume, args.overrides)
    return args


# ------------------------------------------------------------------------------------------------ setup

@dataclass(frozen=True)
class Run:
    """What the loop needs, fixed for the whole run."""
    cfg: RunConfig
    engine: DeepSpeedEngine
    objective: Objective
    data: TokenizedData | MixedData
    order: EpochOrder | MixtureOrder | RepeatedOrder
    layout: BatchLayout
    total_steps: int
    rank: int
    checkpointer: Checkpointer
    evaluator: Evaluator | None
    grad_norm: GradNorm

    def before_update(self) -> None:
        """The step's gradients are complete; the optimizer is about to use them (the objective calls it)."""
        self.grad_norm.before_update()
        self.checkpointer.before_update()


def lora_base_files(cfg: RunConfig, rank: int, world: int) -> dict | None:
    """A LoRA run's base model files and their hashes (the ranks share the hashing, once per file version)."""
    if cfg.model.lora is None or cfg.model.name_or_path is None:
        return None  # a random-init base is identified by model.config and the seed
    with scratch_folder(cfg.checkpoint_dir, rank) as scratch:  # a folder every node sees (checked before)
        board = Rendezvous(scratch, rank, world, f"hashing the base model {cfg.model.name_or_path}")
        return lora.base_model_files(cfg.model.name_or_path, board, cfg.model.revision)


def write_run_files(cfg: RunConfig, ds_config: dict) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(cfg.to_yaml())
    (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def setup(args) -> tuple[Run, TrainState]:
    rank, world, _ = init_distributed()
    cfg = load_config(args.config, args.overrides)
    set_deterministic(cfg.train.deterministic)  # before anything computes on the device
    is_main = rank == 0
    if cfg.logging.wandb is not None:
        decide(check_wandb_installed, runs_here=is_main)  # before anything long
    if cfg.model.lora is not None:
        decide(lora.check_peft_installed, runs_here=is_main)
    decide(lambda: optim.check_installed(cfg.train.optimizer), runs_here=is_main)
    if cfg.model.quantization is not None:
        decide(quantization.check_installed, runs_here=is_main)

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.data.chat_template,
                         **cfg.model.hub_options(for_tokenizer=True))
    # Prepared by the CLI before the launch, or here by the first rank to take the cache's lock while
    # the others wait on the file (no collective: preparing may take longer than DEEPSPEED_TIMEOUT).
    say = messages.say if is_main else (lambda msg: None)
    data = prepare_training_data(cfg.data, tok, say=say)
    if is_main and data.skipped_rows:
        messages.say(f"skipped {data.skipped_rows} rows with no target tokens after masking/truncation")
    if is_main and data.truncated_pairs:
        what = "prompts" if cfg.data.format == "prompt" else "pairs"
        messages.say(f"truncated {data.truncated_pairs} {what} to data.max_length/max_prompt_length (the prompt's end "
                     f"kept)")
    group = SequenceGroup.of(cfg, world, rank)  # DP x SP; SP=1: every rank its own
    evaluator, train_rows = build_evaluator(cfg, tok, data, group.dp_rank, group.dp_size, say)
    order = epoch_order(cfg, data, train_rows)

    check_shared_checkpoint_dir(cfg.checkpoint_dir, rank, world)
    plan = resume.plan(cfg, args, rank, world,
                       lambda global_batch: config_fingerprint(cfg, global_batch, data.content_hash,
                                                               lora_base_files(cfg, rank, world)))
    layout = plan.layout
    ds_config = zero_config_for_run(cfg, world, layout.micro_batch_size, layout.grad_accum, on_gpu=on_cuda(),
                                    download_model_config=True)
    total_steps = order.total_steps(cfg.train, layout.global_batch)

    seed_everything(cfg.train.seed)  # identical initial weights on every rank, stage and world size
    model = build_model(cfg, ds_config)
    isolate = cfg.data.isolates
    if isolate:
        check_isolated_packing(model, layout.micro_batch_size)
    # Ulysses replaces the model's attention function before the engine exists (its groups are the mpu).
    mpu, ulysses = attach(model, group.size, layout.micro_batch_size, isolate)
    resume.load_converted_weights(plan, model)  # a checkpoint of another stage or world size, before the engine
    engine = build_engine(model, cfg, ds_config, total_steps, mpu=mpu)
    # Dropout RNG: rank r draws from seed + r (a rank a resumed run did not have gets the same rule).
    seed_everything(cfg.train.seed + rank)

    checkpointer = Checkpointer.for_run(cfg, engine, model, tok, rank, world)
    # Built before a checkpoint is loaded: a precomputed DPO reference is computed from the base's weights.
    objective = build_objective(ObjectiveParts(cfg, engine, model, ds_config, data, evaluator and evaluator.data,
                                               layout, tok.pad_token_id, rank, world, group, ulysses,
                                               plan.converted is None, say, tok, Path(args.config).resolve().parent))
    checkpointer.objective = objective  # an objective's own state (GRPO's rollouts) is saved and restored
    # What this run is, saved with every checkpoint (differs from a resumed checkpoint's only under
    # --allow-config-change).
    identity = dict(seed=cfg.train.seed, global_batch=layout.global_batch, data_format_version=DATA_FORMAT_VERSION,
                    fingerprint=plan.fingerprint)
    state = replace(checkpointer.load(plan), **identity)
    mixture = getattr(order, "inner", order)  # under a RepeatedOrder
    if is_main and isinstance(mixture, MixtureOrder) and plan.source is not None:
        change = mix_change_message(mixture, state.mix, state.step)
        if change:
            messages.say(change)
    if cfg.logging.wandb is not None:
        state.wandb_run_id = state.wandb_run_id or secrets.token_hex(4)  # rank 0's is the one saved
    if is_main:
        write_run_files(cfg, ds_config)
    barrier()
    return (Run(cfg, engine, objective, data, order, layout, total_steps, rank, checkpointer, evaluator,
                GradNorm(engine)), state)


# ------------------------------------------------------------------------------------------------ step

@dataclass(frozen=True)
class StepOutcome:
    """What every rank agrees on after a step, through one all-reduce."""
    loss: float            # the step's loss: summed over the global batch / the objective's normaliser
    stop: bool             # some rank was asked to stop (SIGTERM/SIGINT)
    time_to_save: bool     # rank 0's clock says `every_minutes` have passed
    writing: bool          # some rank's background checkpoint write is still running
    metrics: dict          # the objective's metrics of the global batch (StepResult.sums and .counts), grad_norm


def agree_on_step(result: StepResult, signum: int, time_to_save: bool, writing: bool,
                  grad_norm=None, is_main: bool = True) -> StepOutcome:
    """`grad_norm`: the step's gradient norm (the same on every rank; None where none is computed), carried
    by the same all-reduce as rank 0's value plus the others' zeros, so it arrives exactly."""
    names = list(result.sums)
    carried = [] if grad_norm is None else [grad_norm if is_main else 0.0]
    loss_sum, stop, time_up, still_writing, *sums = sum_over_ranks(
        [result.loss_sum, signum, time_to_save, writing, *carried, *(result.sums[k][0] for k in names)])
    norm = {"grad_norm": sums.pop(0)} if carried else {}
    metrics = {k: total / result.sums[k][1] for k, total in zip(names, sums) if result.sums[k][1]}
    return StepOutcome(loss_sum / result.normaliser, stop > 0, time_up > 0, still_writing > 0,
                       {**norm, **metrics, **result.counts})


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


# ------------------------------------------------------------------------------------------------ loop

def fit(run: Run, state: TrainState, metrics, stop: StopSignal) -> int:
    """The loop: each step takes the next global batch of the order, runs the objective's step, agrees
    with the other ranks on its outcome, logs it and hands it to the Checkpointer."""
    cfg, gb = run.cfg, run.layout.global_batch
    while state.step < run.total_steps:
        batch = run.order.batch(state, gb)
        if batch is None:  # train.epochs are done
            break
        lr = run.engine.get_lr()[0]
        result = run.objective.step(run.engine, batch.units, state.step + 1, run.before_update)
        fault_point("after_step", run.rank, state.step + 1)
        outcome = agree_on_step(result, stop.signum, run.checkpointer.time_due(), run.checkpointer.writing(),
                                run.grad_norm.value(), run.rank == 0)

        step_tokens = unit_tokens(run.data, batch.units)
        state.advance(batch.position, gb if batch.samples is None else batch.samples, step_tokens)
        # The HF Trainer's and TRL's keys; `lr` and `tokens` (this file's names before them) are written too
        # for one release (docs/config.md, "metrics.jsonl").
        record = {"step": state.step, "loss": outcome.loss, "learning_rate": lr, "lr": lr, "epoch": state.epoch,
                  "consumed_samples": state.consumed_samples, "num_tokens": state.tokens, "tokens": state.tokens,
                  "time": time.time(), **outcome.metrics}
        if cfg.logging.sample_ids:
            record["sample_ids"] = run.order.sample_ids(batch.units)
        if run.evaluator is not None and run.evaluator.due(state.step, run.total_steps):
            scores = run.evaluator.evaluate(run.engine, run.objective)
            state.eval_loss, state.eval_step = scores["eval_loss"], state.step
            record.update(scores)
        metrics.log(record, step_tokens)

        if outcome.stop:  # a rank that got no signal itself reports SIGTERM's code
            run.checkpointer.stop(state, metrics.message)
            return 128 + (stop.signum or signal.SIGTERM)
        run.checkpointer.after_step(state, outcome.writing, outcome.time_to_save, metrics.message)

    run.checkpointer.close(state, metrics.message)
    metrics.message(messages.tagged(f"done: {state.step} steps; outputs in {cfg.output_dir}"))
    return 0


def main(argv=None) -> None:
    args = parse_args(argv)
    metrics = NullMetricsWriter()
    try:
        run, state = setup(args)
        if run.rank == 0:
            lg = run.cfg.logging
            wandb = (lg.wandb, state.wandb_run_id, run.cfg.model_dump(mode="json")) if lg.wandb else None
            metrics = MetricsWriter(Path(run.cfg.output_dir), state.step, run.total_steps, lg.tensorboard,
                                    lg.progress_bar, wandb)
        code = fit(run, state, metrics, StopSignal())
        unfired = unfired_fault(run.rank)
        if unfired and code == 0:  # a test whose fault never happened must not pass (this rank's own line)
            print(f"error: DS_FINETUNE_FAULT={unfired} never fired (no such phase, rank or step in this run)",
                  file=sys.stderr, flush=True)
            code = 4
    except UserError as e:
        # Every rank reaches the same error; one line from rank 0 is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e.message}", file=sys.stderr, flush=True)
        code = e.exit_code
    finally:
        metrics.close()
    sys.stdout.flush()
    # Skip interpreter teardown: DeepSpeed/gloo atexit hooks can hang or print noise after the work is done.
    os._exit(code)


if __name__ == "__main__":
    main()
