"""The Checkpointer: owns saving for the training loop (when a save is due, now or in the background, the
commit of a background save, the final save and export) and loads the checkpoint a run resumes from."""

from __future__ import annotations

import time
from pathlib import Path

from ds_finetune.checkpoint import ds_internals, reshard
from ds_finetune.checkpoint.async_save import BackgroundWrite
from ds_finetune.checkpoint.commit import SaveSpec, commit_files, save_checkpoint, write_files
from ds_finetune.checkpoint.export import export_checkpoint, write_hf_files
from ds_finetune.checkpoint.layout import tag_for_step
from ds_finetune.checkpoint.resume import ResumePlan
from ds_finetune.config import RunConfig
from ds_finetune.dist import all_gather, capture_rng, restore_rng
from ds_finetune.errors import UserError, first_line
from ds_finetune.messages import say, tagged
from ds_finetune.model import param_group_names
from ds_finetune.state import TrainState


class Checkpointer:
    """Built once per run (`for_run`), one on every rank: owns saving and loading. The loop calls
    `after_step` after every optimizer step, `stop` when the ranks agreed to stop on a signal, and `close`
    at the end; the Checkpointer decides what is due, saves (now or in the background), commits, reports
    through `say`, and runs the final save and export. `load` restores the checkpoint the run resumes from."""

    def __init__(self, engine, ckpt_cfg, ckpt_dir: Path, rank: int, world: int, extra_client_state: dict,
                 write_extra=None, trainable_only: bool = False, export_to: Path | None = None,
                 export_dtype: str = "fp32"):
        self.engine, self.cfg, self.dir, self.rank, self.world = engine, ckpt_cfg, ckpt_dir, rank, world
        self.spec = SaveSpec(engine, ckpt_dir, rank, world, ckpt_cfg.keep_last, ckpt_cfg.keep_best, trainable_only,
                             write_extra)
        self.export_to, self.export_dtype = export_to, export_dtype  # checkpoint.export_final
        self.in_flight = None  # async_save: (BackgroundWrite, tag dir, trainer state) of the uncommitted save
        self.extra_client_state = extra_client_state  # constant for the run (e.g. param group names)
        self.saved_step, self.last_save_time = 0, time.time()  # `load` sets the step resumed from
        # The objective, where it keeps state of its own between steps (GRPO's rollout buffer under
        # num_iterations > 1): its `checkpoint_state()` (plain values, per rank) is saved beside every rank's
        # RNG state and handed back to its `restore_checkpoint_state` on load.
        self.objective = None

    @classmethod
    def for_run(cls, cfg: RunConfig, engine, model, tok, rank: int, world: int) -> "Checkpointer":
        """The run's Checkpointer: what it saves besides DeepSpeed's files (the parameter groups' names,
        the Hugging Face config and tokenizer), whether only the trainable (LoRA) weights, and the final
        export, all from the run config."""
        export_to = Path(cfg.output_dir) / "final_model" if cfg.checkpoint.export_final else None
        return cls(engine, cfg.checkpoint, cfg.checkpoint_dir, rank, world,
                   extra_client_state={"param_group_names": param_group_names(model)},
                   write_extra=lambda tag_dir: write_hf_files(tag_dir, engine.module, tok),
                   trainable_only=cfg.model.lora is not None, export_to=export_to, export_dtype=cfg.model.dtype)

    # -- the loop's three calls (every rank, at the same step)

    def after_step(self, state: TrainState, writing_anywhere: bool, time_to_save: bool, say) -> None:
        """After optimizer step `state.step`: commit a background save once no rank is still writing it
        (the ranks agreed on both flags in the step's all-reduce), then save if one is due."""
        if self.in_flight is not None and not writing_anywhere:
            self._commit_in_flight(say)
        reason = self.due(state.step, time_to_save)
        if reason:
            self._save(state, reason, say)

    def stop(self, state: TrainState, say) -> None:
        """The ranks agreed to stop after this step (SIGTERM/SIGINT): save unless disabled, and commit."""
        path = self._save(state, "stop requested", say) if self.cfg.save_on_signal else None
        self._commit_in_flight(say)  # this save, or one still in flight: committed before the exit
        if path is not None:
            say(tagged(f"stopped by signal at step {state.step}; resume with --resume (checkpoint {path})"))
        else:
            say(tagged(f"stopped by signal at step {state.step} without saving "
                       f"(checkpoint.save_on_signal=false)"))

    def close(self, state: TrainState, say) -> None:
        """The run is done: the final save if one is due, every save committed, the final export."""
        if self.needs_final_save(state.step):
            self._save(state, "final", say)
        self._commit_in_flight(say)
        if self.export_to is not None and self.rank == 0:
            # Rank 0 alone, and no rank waits for it: an export longer than the process-group timeout would
            # otherwise end in the NCCL watchdog's abort. The other ranks exit; the launcher waits for all.
            out = export_checkpoint(self.dir / tag_for_step(state.step), self.export_to, self.export_dtype)
            say(tagged(f"exported a Hugging Face model to {out}"))

    def _save(self, state: TrainState, reason: str, say) -> Path:
        self._commit_in_flight(say)  # at most one save in flight
        path = self.save(state)
        written = "writing it in the background" if self.in_flight else "saved"
        say(tagged(f"{written} {path} ({reason})"))
        return path

    def _commit_in_flight(self, say) -> None:
        path = self.finish()
        if path is not None:
            say(tagged(f"saved {path} (written in the background)"))

    # -- the pieces

    def time_due(self) -> bool:
        """Rank 0's clock says `every_minutes` have passed (the ranks agree on it through the step's reduce)."""
        return (self.rank == 0 and self.cfg.every_minutes > 0
                and time.time() - self.last_save_time >= 60 * self.cfg.every_minutes)

    def due(self, step: int, time_due: bool) -> str | None:
        """Why a save is due after `step`, or None."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return "every_steps"
        return "every_minutes" if time_due else None

    def needs_final_save(self, step: int) -> bool:
        return (self.cfg.save_final or self.cfg.export_final) and self.saved_step != step

    def save(self, state: TrainState) -> Path:
        """Save `state.step`: written and committed now, or with `async_save` handed to a background writer
        (committed later by `finish`). A save still in flight is committed first: at most one at a time."""
        self.finish()
        client_state = {"rng_states": all_gather(capture_rng()), **self.extra_client_state}
        own = getattr(self.objective, "checkpoint_state", None)
        if own is not None:
            client_state["objective_states"] = all_gather(own())
        if self.cfg.async_save:
            background = BackgroundWrite(self.rank, state.step)
            path, _ = write_files(self.spec, state.step, client_state, background)
            background.start()
            self.in_flight = (background, path, state.to_manifest())
        else:
            path = save_checkpoint(self.spec, state.step, client_state, state.to_manifest())
        self.saved_step, self.last_save_time = state.step, time.time()
        return path

    def before_update(self) -> None:
        """The optimizer is about to change the weights: a background save must have its snapshot by now."""
        if self.in_flight is not None:
            self.in_flight[0].wait_until_copied()

    def writing(self) -> bool:
        """This rank's background write is still running (the ranks agree on it in the step's reduce)."""
        return self.in_flight is not None and not self.in_flight[0].done()

    def finish(self) -> Path | None:
        """Commit the save in flight once this rank's files are durable (waiting for them); every rank calls
        it at the same step. Returns the committed tag dir, or None when no save was in flight."""
        if self.in_flight is None:
            return None
        background, tag_dir, trainer_state = self.in_flight
        self.in_flight = None
        try:
            own = background.relative(tag_dir)
        except (OSError, RuntimeError) as e:  # sent to every rank through the commit
            own = first_line(e)
        commit_files(self.spec, tag_dir, background.step, own, trainer_state)
        return tag_dir

    # -- loading

    def load(self, plan: ResumePlan) -> TrainState:
        """The plan's checkpoint into the engine (weights, optimizer, LR schedule; natively, or from the
        converted copy, whose weights `resume.load_converted_weights` put in the model before the engine
        existed), this rank's RNG, and the trainer's progress; a fresh TrainState when the plan starts
        fresh. Every rank calls it once the engine exists."""
        if plan.source is None:
            return TrainState()
        if plan.converted is None:
            client_state = self._load_native(plan.source)
        else:
            reshard.load_optimizer_state(self.engine, plan.converted)
            client_state = plan.converted.meta
        rng_states = client_state["rng_states"]
        if self.rank < len(rng_states):  # a rank the saved run did not have keeps the seed + rank rule
            restore_rng(rng_states[self.rank])
        objective_states = client_state.get("objective_states") or []
        if hasattr(self.objective, "restore_checkpoint_state") and self.rank < len(objective_states):
            self.objective.restore_checkpoint_state(objective_states[self.rank])
        state = TrainState.from_manifest(plan.source.manifest)
        if self.rank == 0:
            say(f"resumed from {plan.source.path} at step {state.step} (epoch {state.epoch}, offset {state.offset})")
        self.saved_step = state.step  # no final save of a step already saved
        return state

    def _load_native(self, info) -> dict:
        """Load a verified native checkpoint into the engine (weights, optimizer, LR schedule); returns its
        client state (every saved rank's RNG state, an objective's own state)."""
        ds_internals.route_checkpoint_reads(self.engine)  # DeepSpeed's loads through the safe unpickler
        load_path, client_state = self.engine.load_checkpoint(
            str(info.path.parent), tag=info.tag, load_module_strict=not self.spec.trainable_only,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"checkpoint error: DeepSpeed could not load {info.path}; run "
                            f"`ds-finetune ckpt verify {info.path}`")
        return client_state
