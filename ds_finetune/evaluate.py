"""Evaluation: the held-out loss at a cadence, on every rank, without disturbing training.

The eval rows are `eval.path` (tokenized and cached like the training data), named `eval.sources`, or a
share `eval.fraction` of the training data chosen from the seed alone and never trained on. The loss is
the global-token mean: summed token losses of every eval row over the number of their target tokens,
reduced over the ranks. Named sources are evaluated one after the other, so a batch never mixes them and
each batch's loss is its source's (`eval_loss/<name>`, the same batches as that source alone as eval.path).
Every rank runs the same number of batches (a rank whose share ran out runs a batch with no target), so
under ZeRO-3 no rank skips a gathered forward. Dropout is off (`model.eval()`), no graph is built, and
every RNG is put back afterwards: a run with evaluation trains bitwise as the same run without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ds_finetune.data import MixedData, TokenizedData, group_indices, group_units, prepare_data, prepare_sources
from ds_finetune.dist import frozen_eval, sum_over_ranks


def held_out_rows(num_rows: int, fraction: float, seed: int, groups: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows to evaluate), both sorted; the split depends on (num_rows, fraction, seed).
    With `groups` (a dataset row per row) whole groups are held out: the turns of one conversation
    (data.chat_turns: last) are never split between training and evaluation."""
    if groups is not None:
        ids = np.unique(groups)
        held = np.isin(groups, ids[held_out_rows(len(ids), fraction, seed)[1]])
        return np.flatnonzero(~held), np.flatnonzero(held)
    n_eval = max(1, round(num_rows * fraction))
    shuffled = np.random.default_rng([seed, 0xE7A1]).permutation(num_rows)
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])


@dataclass(frozen=True)
class Evaluator:
    data: TokenizedData | MixedData
    groups: tuple           # eval row indices into `data`, in a fixed order: one array per named source, or one
    micro_batch_size: int
    max_batches: int        # per group
    every_steps: int
    rank: int               # the data-parallel rank and size (ranks that share sequences share rows)
    world: int
    names: tuple = ()       # eval.sources: each group's name (eval_loss/<name>); empty: one unnamed group

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def batches(self, rows: np.ndarray) -> int:
        """Batches every rank runs over `rows` (one group)."""
        n = math.ceil(len(rows) / (self.micro_batch_size * self.world))
        return min(n, self.max_batches) if self.max_batches else n

    def evaluate(self, engine, objective) -> dict[str, float]:
        """`eval_loss` (the objective's loss over the eval rows: the mean token loss, and then `eval_ppl`; for
        DPO the mean pair loss), `eval_loss/<name>` of each named source, and the objective's other metrics
        `eval_<name>`: each sum over the loss's count, or over its own count where the objective gives
        (sum, count) (KTO's per-label means); not logged where that count is 0. Every rank calls this at the
        same step."""
        with frozen_eval(engine.module):
            group_sums = [self._run_group(engine, objective, rows) for rows in self.groups]
        # One all-reduce: each group's loss sum, each group's target count, then the objective's sums and the
        # counts of those that bring their own (value, count).
        n, names = len(self.groups), list(dict.fromkeys(k for _, _, sums in group_sums for k in sums))
        own = [k for k in names if any(isinstance(sums.get(k), tuple) for _, _, sums in group_sums)]
        part = (lambda v, i: v[i] if isinstance(v, tuple) else v)
        totals = sum_over_ranks([*(loss for loss, _, _ in group_sums), *(count for _, count, _ in group_sums),
                                 *(sum(part(sums.get(k, 0), 0) for _, _, sums in group_sums) for k in names),
                                 *(sum(part(sums.get(k, (0, 0)), 1) for _, _, sums in group_sums) for k in own)])
        losses, counts = totals[:n], totals[n:2 * n]
        others, own_counts = totals[2 * n:2 * n + len(names)], dict(zip(own, totals[2 * n + len(names):]))
        scores = {"eval_loss": sum(losses) / sum(counts)}
        if objective.perplexity:  # a mean token loss (a pair's loss is not)
            scores["eval_ppl"] = math.exp(min(scores["eval_loss"], 50.0))
        scores |= {f"eval_loss/{name}": loss / count for name, loss, count in zip(self.names, losses, counts) if count}
        divisors = {k: own_counts.get(k, sum(counts)) for k in names}
        return {**scores, **{f"eval_{k}": v / divisors[k] for k, v in zip(names, others) if divisors[k]}}

    def _run_group(self, engine, objective, rows: np.ndarray) -> tuple[torch.Tensor, int, dict]:
        """This rank's (summed loss on the device, counted targets, the objective's sums) over one group."""
        loss_sum, count, sums = torch.zeros((), dtype=torch.float64, device=engine.device), 0, {}
        for b in range(self.batches(rows)):
            start = (b * self.world + self.rank) * self.micro_batch_size
            mine = rows[start:start + self.micro_batch_size]
            units = self.units(mine if len(mine) else rows[:1])
            batch_loss, batch_count, batch_sums = objective.eval_batch(engine, self.data, units, bool(len(mine)))
            loss_sum += batch_loss  # stays on the device
            count += batch_count
            sums = {k: _added(sums.get(k), v) for k, v in batch_sums.items()}
        return loss_sum, count, sums

    def units(self, rows: np.ndarray) -> np.ndarray:
        """Eval units of `rows`: one row each, or where the data's rows come in groups (a preference pair) a
        group's rows (`rows` are then group indices)."""
        k = self.data.rows_per_unit
        return group_units(rows, k) if k > 1 else rows.reshape(-1, 1)


def _added(total, value):
    """A metric's running sum: a number, or (value, count) for an objective's metric with its own count."""
    if total is None:
        return value
    return (total[0] + value[0], total[1] + value[1]) if isinstance(value, tuple) else total + value


def build_evaluator(cfg, tok, data: TokenizedData, rank: int, world: int, say=None):
    """(Evaluator or None, the rows to train on or None for all). `say` reports waits for the eval data.
    `rank` and `world`: the data-parallel rank and size."""
    e = cfg.eval
    if not e.enabled:
        return None, None
    if e.sources is not None:  # a group of rows per source (MixedData: source s is rows bases[s]..)
        eval_data = prepare_sources(cfg.data, e.sources, tok, say=say)
        bases, k = eval_data.bases, eval_data.rows_per_unit
        evaluator = Evaluator(eval_data, tuple(np.arange(bases[s] // k, bases[s + 1] // k)  # groups where k > 1
                                               for s in range(len(e.sources))),
                              e.micro_batch_size or cfg.train.micro_batch_size, e.max_batches, e.every_steps, rank,
                              world, names=tuple(eval_data.names))
        return evaluator, None
    if e.path is not None:
        eval_data = prepare_data(cfg.data.model_copy(update={"path": e.path, "sources": None}), tok, say=say)
        train_rows, eval_rows = None, np.arange(eval_data.num_rows)
    else:
        eval_data = data
        turns = cfg.data.format == "chat" and cfg.data.chat_turns == "last"
        grouped = data.rows_per_unit > 1  # a group's rows (a pair's) share its row id: whole groups are held out
        train_rows, eval_rows = held_out_rows(data.num_rows, e.fraction, cfg.train.seed,
                                              groups=np.asarray(data.row_ids) if turns or grouped else None)
    if eval_data.rows_per_unit > 1:
        eval_rows = group_indices(eval_data.num_rows, eval_rows, eval_data.rows_per_unit)
    evaluator = Evaluator(eval_data, (eval_rows,), e.micro_batch_size or cfg.train.micro_batch_size, e.max_batches,
                          e.every_steps, rank, world)
    return evaluator, train_rows
