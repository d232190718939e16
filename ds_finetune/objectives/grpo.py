"""Group relative policy optimisation (train.objective: grpo), online RL on verifiable rewards: each step
samples G completions of every prompt of the global batch from the policy (rollout.py), scores them
(rewards.py), turns the rewards into group-relative advantages and takes one clipped policy-gradient step
(grpo_loss.py: TRL's math).

Layout. The global batch counts prompts (units of the epoch order, one prompt row each); a rank takes its
share as SFT does, micro-step by micro-step, `train.micro_batch_size` prompts a micro-step, and a micro-step
runs their G completions each (micro_batch_size x G sequences, a prompt's G consecutive): the G completions
of one prompt are sampled, scored and normalised on one rank, whatever the world size. Each micro-batch's
completions come from a generator seeded by (seed, step, rank, micro-batch) (rollout.rollout_generator).

Across ranks. The rewards, completion lengths and clipping flags of the whole global batch are gathered
(one all_gather on the device) so that every rank computes the advantages (`scale_rewards: batch`: the
global batch's std) and the logged metrics as TRL does on its gathered tensors; the completions' text and
any reward error travel in one object gather (rank 0 writes `completions.jsonl`; an error on one rank is
every rank's one line).

num_iterations μ > 1. Step s uses the generation of the first step of its block of μ (steps b, b+1, ...,
b+μ-1 with b = s - (s-1) mod μ), and the old policy's token log-probs computed then; the loop hands every
step of a block the same units (data.RepeatedOrder, TRL's RepeatSampler).
A kill inside a block must still resume exactly, and the block's first weights are gone by then, so the
generation itself is saved: every checkpoint holds each rank's buffer (`checkpoint_state`: token ids,
masks, advantages, old and reference log-probs and the logged metrics, as plain lists: exact for int64
and float32, and JSON for a converted copy's meta), and a resume inside the block takes it back
(`restore_checkpoint_state`). A buffer of another layout (world size, rank, micro-batches) is not reused:
such a resume is refused in one line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ds_finetune import lora
from ds_finetune.data import HostFacts
from ds_finetune.dist import frozen_eval, gather_rows
from ds_finetune.errors import UserError
from ds_finetune.faults import fault_point
from ds_finetune.loss import make_token_logps_fn
from ds_finetune.metrics import truncate_metrics
from ds_finetune.objectives import ObjectiveParts, StepResult, accumulate
from ds_finetune.objectives.grpo_gather import gather_objects, sum_vector
from ds_finetune.objectives.grpo_loss import (TOKEN_METRICS, advantages, length_metrics, micro_batch_loss, reward_metrics,
                                              token_losses, token_metric_sums, token_metrics)
from ds_finetune.objectives.rewards import Reward, build_rewards, score
from ds_finetune.objectives.rollout import Rollout, SamplingRollout, left_padded, rollout_generator

IGNORE_INDEX = -100


@dataclass
class MicroRollout:
    """One micro-batch's completions, ready for the loss: [prompt left-padded | completion right-padded]
    (TRL's layout), labels on the completion tokens, and per completion its advantage; the old policy's and
    the reference's token log-probs where needed (flat, row-major)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    rows: torch.Tensor          # the completion of each target token
    facts: HostFacts
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def as_batch(self) -> tuple:
        return (self.input_ids, self.attention_mask, self.labels, self.advantages, self.rows, self.old_logps,
                self.ref_logps, self.facts)


@dataclass
class Generation:
    """A step's rollout on this rank, and what the steps of its block log."""
    step: int
    batches: list[MicroRollout]
    normaliser: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GRPOLoss:
    """A micro-batch's summed loss and its token-metric sums (accumulate's loss_fn contract); the sums are
    placed in row `slot` of a [micro-batches, TOKEN_METRICS + count] matrix so that accumulate's sum over the
    micro-batches keeps each one's apart (TRL averages per micro-step means)."""
    logps_fn: object
    temperature: float
    epsilon: float
    epsilon_high: float
    beta: float
    loss_type: str
    max_completion_length: int
    micro_batches: int
    bias_correction_kl: bool = True

    def __call__(self, engine, input_ids, attention_mask, labels, advantages, rows, old_logps, ref_logps, facts,
                 grad_scale=1.0, slot: int = 0):
        n = int(facts.targets.sum())
        entropy = torch.empty(n, dtype=torch.float32, device=input_ids.device)
        logps = self.logps_fn(engine, input_ids, attention_mask, labels, facts, temperature=self.temperature,
                              entropy=entropy)
        per_token, kl, clips = token_losses(logps, old_logps, ref_logps, advantages[rows], self.epsilon,
                                            self.epsilon_high, self.beta, self.bias_correction_kl)
        loss = micro_batch_loss(per_token, rows, labels.size(0), self.loss_type, self.max_completion_length)
        sums = torch.zeros((self.micro_batches, len(TOKEN_METRICS) + 1), dtype=torch.float64, device=input_ids.device)
        sums[slot] = token_metric_sums(kl, entropy, clips)
        return loss, sums.flatten()


class GRPO:
    metric_names = ()  # its metrics are numbers of the global batch (StepResult.counts), computed here
    perplexity = False

    def __init__(self, parts: ObjectiveParts, rollout: Rollout, rewards: list[Reward], loss: GRPOLoss, reference):
        cfg = parts.cfg
        self.cfg, self.g, self.data, self.layout = cfg.grpo, cfg.grpo.num_generations, parts.data, parts.layout
        self.rollout, self.rewards, self.loss, self.reference = rollout, rewards, loss, reference
        self.tok, self.pad_id, self.rank, self.share, self.seed = parts.tokenizer, parts.pad_id, parts.rank, \
            parts.group.dp_rank, cfg.train.seed
        self.labels = _row_labels(cfg, parts.data)
        self.log_path = Path(cfg.output_dir) / "completions.jsonl"
        self.generation: Generation | None = None
        self.log_trimmed = False

    # -- the step

    def step(self, engine, units: np.ndarray, step: int, before_update=None) -> StepResult:
        mu = self.cfg.num_iterations
        first = step - (step - 1) % mu
        if self.generation is None or self.generation.step != first:
            if step != first:
                raise UserError(f"checkpoint error: step {step} reuses the completions of step {first} "
                                f"(grpo.num_iterations={mu}), which this checkpoint holds for another world size or "
                                f"batch layout; resume on the layout it was saved with, or from the checkpoint of "
                                f"step {first - 1} (--resume PATH --discard-newer)")
            self.generation = self.roll_out(engine, units, step)
        gen = self.generation
        t0 = time.perf_counter()
        loss_sum, sums = accumulate(engine, self.loss, [b.as_batch() for b in gen.batches], gen.normaliser, step,
                                    before_update, per_batch=[{"slot": m} for m in range(len(gen.batches))])
        per_micro = torch.tensor(sum_vector(sums), dtype=torch.float64).view(len(gen.batches), -1)
        counts = {**gen.metrics, **token_metrics(per_micro, self.cfg.beta),
                  "time/update": time.perf_counter() - t0}
        if step != first:
            counts["time/generate"] = counts["time/reward"] = 0.0
        return StepResult(loss_sum, gen.normaliser, counts=counts)

    def roll_out(self, engine, units: np.ndarray, step: int) -> Generation:
        """Sample, score and prepare this rank's micro-batches of step `step` (the whole global batch's metrics)."""
        g, t0 = self.g, time.perf_counter()
        mine = [units[self.layout.micro_slice(0, m, self.share)] for m in range(self.layout.grad_accum)]
        prompt_rows = [[int(u[0]) for u in micro] for micro in mine]
        sampled = []
        for m, rows in enumerate(prompt_rows):
            prompts = [np.asarray(self.data.row(r)[0]) for r in rows for _ in range(g)]
            generator = rollout_generator(engine.device, self.seed, step, self.rank, m)
            sampled.append(self.rollout.generate(engine, prompts, generator))
        t1 = time.perf_counter()
        flat_rows = [r for rows in prompt_rows for r in rows for _ in range(g)]
        completions = [c for batch in sampled for c in batch]
        columns = [self.data.row_columns(r) for r in flat_rows]
        texts = self.tok.batch_decode(completions, skip_special_tokens=True)
        prompts = [c["prompt"] for c in columns]
        given = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        error, per_func = None, None
        try:
            per_func = score(self.rewards, prompts, given, completions, columns,
                             [self.labels(r) for r in flat_rows], lambda: fault_point("in_reward", self.rank, step))
        except UserError as e:
            error = e.message
        t2 = time.perf_counter()
        # every rank's error and completions, in rank order (no rank waits in a collective for one that failed)
        shared = gather_objects((error, [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]))
        errors = [e for e, _ in shared if e]
        if errors:
            raise UserError(errors[0])
        eos = set(self.rollout.eos_ids)
        truncated = [c[-1] not in eos for c in completions]
        local = torch.tensor([[*f, len(c), t] for f, c, t in zip(per_func, completions, truncated)],
                             dtype=torch.float32)
        every = gather_rows(local, engine.device)  # [world x local completions, functions + 2]
        f = len(self.rewards)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        adv, std_zero = advantages(every[:, :f], weights, g, self.cfg.scale_rewards)
        n = len(completions)
        mine_adv = adv[self.rank * n:(self.rank + 1) * n]
        lengths, clipped = every[:, f], every[:, f + 1].bool()
        masked = clipped if self.cfg.mask_truncated_completions else torch.zeros_like(clipped)
        metrics = {**reward_metrics(every[:, :f], weights, [r.name for r in self.rewards], std_zero),
                   **length_metrics(lengths, clipped), "time/generate": t1 - t0, "time/reward": t2 - t1}
        loss_tokens = int((lengths.double() * (~masked)).sum().item())  # fp32 counts exactly only to 2^24
        normaliser = loss_tokens if self.cfg.loss_type == "dapo" else len(every)
        batches, start = [], 0
        for m, batch in enumerate(sampled):
            prompts_m = [np.asarray(self.data.row(r)[0]) for r in prompt_rows[m] for _ in range(g)]
            stop = start + len(batch)
            batches.append(self._micro_rollout(engine, prompts_m, batch, mine_adv[start:stop],
                                               [bool(x) for x in masked[self.rank * n + start:self.rank * n + stop]]))
            start = stop
        self._write_log(step, shared, every, adv, f)
        return Generation(step, batches, max(normaliser, 1), metrics)

    def _micro_rollout(self, engine, prompts, completions, adv, masked: list[bool]) -> MicroRollout:
        ids, prompt_mask = left_padded(prompts, self.pad_id, "cpu")
        width = max(len(c) for c in completions)
        comp = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        comp_mask = torch.zeros((len(completions), width), dtype=torch.long)
        for r, c in enumerate(completions):
            comp[r, :len(c)] = torch.tensor(c)
            comp_mask[r, :len(c)] = 0 if masked[r] else 1
        input_ids = torch.cat([ids, comp], 1)
        attention = torch.cat([prompt_mask, comp_mask], 1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, ids.size(1):] = torch.where(comp_mask.bool(), comp, IGNORE_INDEX)
        facts = HostFacts.of_labels(labels.numpy())
        out = MicroRollout(input_ids, attention, labels, adv.float().cpu(), _token_rows(facts), facts)
        device_batch = (input_ids.to(engine.device), attention.to(engine.device), labels.to(engine.device))
        if self.cfg.num_iterations > 1:  # the old policy: this step's weights, before its update
            with frozen_eval(engine.module):
                out.old_logps = self.loss.logps_fn(engine, *device_batch, facts,
                                                   temperature=self.cfg.temperature).detach()
        if self.cfg.beta != 0.0:
            out.ref_logps = self.reference(engine, *device_batch, facts).detach()
        return out

    # -- the rollout buffer in checkpoints (num_iterations > 1)

    def checkpoint_state(self) -> dict | None:
        gen = self.generation
        if self.cfg.num_iterations == 1 or gen is None:
            return None
        plain = (lambda t: None if t is None else t.tolist())
        return {"step": gen.step, "layout": self._layout_key(), "normaliser": gen.normaliser, "metrics": gen.metrics,
                "batches": [{"input_ids": plain(b.input_ids), "attention_mask": plain(b.attention_mask),
                             "labels": plain(b.labels), "advantages": plain(b.advantages),
                             "old_logps": plain(b.old_logps), "ref_logps": plain(b.ref_logps)} for b in gen.batches]}

    def restore_checkpoint_state(self, state: dict | None) -> None:
        if not state or state.get("layout") != self._layout_key():
            return  # none saved, or another layout's: a step inside its block is refused (`step`)
        batches = []
        for b in state["batches"]:
            labels = torch.tensor(b["labels"], dtype=torch.long)
            facts = HostFacts.of_labels(labels.numpy())
            as_tensor = (lambda v: None if v is None else torch.tensor(v, dtype=torch.float32))
            batches.append(MicroRollout(torch.tensor(b["input_ids"], dtype=torch.long),
                                        torch.tensor(b["attention_mask"], dtype=torch.long), labels,
                                        as_tensor(b["advantages"]), _token_rows(facts), facts,
                                        as_tensor(b["old_logps"]), as_tensor(b["ref_logps"])))
        self.generation = Generation(int(state["step"]), batches, int(state["normaliser"]), dict(state["metrics"]))

    def _layout_key(self) -> list:
        return [self.layout.world_size, self.share, self.layout.micro_batch_size, self.layout.grad_accum, self.g]

    # -- completions.jsonl

    def _write_log(self, step: int, shared: list, every: torch.Tensor, adv: torch.Tensor, f: int) -> None:
        """Rank 0: this step's prompts, completions, rewards and advantages, one line each; lines of steps at
        or after the first step this process runs are dropped first (a resumed run repeats no step)."""
        if self.rank != 0:
            return
        import json
        if not self.log_trimmed:
            truncate_metrics(self.log_path, step - 1)
            self.log_trimmed = True
        names = [r.name for r in self.rewards]
        values = every.tolist()
        lines, k = [], 0
        for _, records in shared:
            for record in records:
                rewards = {name: (None if math.isnan(v) else v) for name, v in zip(names, values[k][:f])}
                lines.append(json.dumps({"step": step, **record, "rewards": rewards, "advantage": float(adv[k])},
                                        ensure_ascii=False))
                k += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))

    def eval_batch(self, engine, data, units, counted):
        raise UserError("config error: evaluation is not supported with train.objective grpo yet")


def _token_rows(facts: HostFacts) -> torch.Tensor:
    """The completion (row) of each target token, row-major."""
    return torch.from_numpy(np.repeat(np.arange(facts.targets.shape[0]), facts.targets.sum(1)))


def _row_labels(cfg, data):
    """FILE:ROW of a prompt row (its dataset row, 1-based), for a reward error's message."""
    if not cfg.data.is_mixture:
        return lambda r: f"{cfg.data.path}:{int(data.row_ids[r]) + 1}"
    paths = [s.path for s in cfg.data.sources]

    def label(r: int) -> str:
        s = int(data.source_of(r))
        return f"{paths[s]}:{int(data.parts[s].row_ids[r - data.bases[s]]) + 1}"
    return label


# ------------------------------------------------------------------------------------------- building

def eos_ids(model, tok) -> list[int]:
    """Every eos the model's generation config declares, the tokenizer's first (as TRL)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids if tok.eos_token_id in ids else [tok.eos_token_id, *ids]


def build(parts: ObjectiveParts) -> GRPO:
    cfg, c = parts.cfg, parts.cfg.grpo
    model = lora.hf_model(parts.model)
    logps_fn = make_token_logps_fn(model, cfg.train.loss_chunk_tokens)
    rollout = SamplingRollout(c.temperature, c.top_p, c.top_k, c.max_completion_length,
                              eos_ids(model, parts.tokenizer), parts.pad_id)
    loss = GRPOLoss(logps_fn, c.temperature, c.epsilon, c.clip_high, c.beta, c.loss_type, c.max_completion_length,
                    parts.layout.grad_accum, c.use_bias_correction_kl)
    reference = None
    if c.beta != 0.0:
        reference = adapters_off(logps_fn, c.temperature) if cfg.model.lora is not None else \
            frozen_reference(cfg, parts.ds_config, c.temperature)
    return GRPO(parts, rollout, build_rewards(cfg.rewards, parts.config_dir, parts.engine.device), loss, reference)


def adapters_off(logps_fn, temperature: float):
    """The reference of a LoRA run: the policy with its adapters disabled (dpo.AdaptersOff's way)."""
    def reference(engine, input_ids, attention_mask, labels, facts):
        with frozen_eval(engine.module), engine.module.disable_adapter():
            return logps_fn(engine, input_ids, attention_mask, labels, facts, temperature=temperature)
    return reference


def frozen_reference(cfg, ds_config: dict, temperature: float):
    """The reference of full fine-tuning: dpo.reference model's frozen copy of the base, as an engine."""
    from ds_finetune.objectives.dpo import frozen_base

    ref_engine = frozen_base(cfg, ds_config).ref_engine
    logps_fn = make_token_logps_fn(ref_engine.module, cfg.train.loss_chunk_tokens)

    def reference(engine, input_ids, attention_mask, labels, facts):
        with torch.no_grad():
            return logps_fn(ref_engine, input_ids, attention_mask, labels, facts, temperature=temperature)
    return reference
