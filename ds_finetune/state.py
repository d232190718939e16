"""`TrainState`: the trainer's progress, the one record the loop advances, the checkpoint saves (in its
manifest) and resume reads back. Its own module because the loop, the data order, the checkpoint and the
export all read it, and none of them owns it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    """Progress that must survive a restart (with the engine's own state and every rank's RNG), and what
    the run is (checked on resume). Stored in the manifest: `to_manifest`/`from_manifest` are its only
    writer and reader."""
    step: int = 0               # optimizer steps done
    epoch: int = 0
    offset: int = 0             # units of this epoch's order already consumed
    consumed_samples: int = 0
    tokens: int = 0
    seed: int = 0
    global_batch: int = 0
    data_format_version: int = 0
    fingerprint: dict = field(default_factory=dict)
    eval_loss: float | None = None  # the latest evaluation, and the step it was run at
    eval_step: int = 0
    wandb_run_id: str | None = None  # one W&B run across resumes
    mix: dict = field(default_factory=dict)  # a mixture's position (data.MixtureOrder.position)

    def advance(self, position: dict, samples: int, tokens: int) -> None:
        """Past one optimizer step: the order's position after it (data.StepBatch.position), the samples
        and tokens it took."""
        for key, value in position.items():
            setattr(self, key, value)
        self.step += 1
        self.consumed_samples += samples
        self.tokens += tokens

    def to_manifest(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "TrainState":
        saved = manifest.get("trainer_state", {})
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
