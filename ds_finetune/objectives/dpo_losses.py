"""DPO's loss types (`dpo.loss_type`, one or a weighted list): TRL 1.16's DPOTrainer formulas, per pair.

Every formula is TRL's (`trl/trainer/dpo_trainer.py`, `_compute_loss`, f-divergence reverse KL), read off its
source; the anchor test (tests/test_dpo.py) compares each against TRL's trainer. With, per pair, the policy's
and the reference's summed completion log-probs, chosen_ratio = policy - reference of the chosen (rejected
alike), d = chosen_ratio - rejected_ratio and eps = dpo.label_smoothing:

  sigmoid       -logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps  (eps > 0 is cDPO: ours; TRL 1.16's
                sigmoid ignores label_smoothing, so the two agree at eps = 0, the default)
  hinge         relu(1 - beta d)
  ipo           (d' - 1 / (2 beta))^2, d' the difference of the log-ratios each divided by its token count
  exo_pair      q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), q_w = sigmoid(beta d), q_l = 1 - q_w
  nca_pair      -logsigmoid(beta cr) - logsigmoid(-beta cr) / 2 - logsigmoid(-beta rr) / 2
  robust        (-(1 - eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) / (1 - 2 eps)
  bco_pair      -logsigmoid(beta cr) - logsigmoid(-beta rr)       (TRL 1.16 keeps no running mean: no state)
  sppo_hard     (cr - 1 / (2 beta))^2 + (rr + 1 / (2 beta))^2
  aot           sigmoid's form on sorted(policy chosen - rejected) - sorted(reference chosen - rejected),
                sorted within the micro-batch as TRL sorts within its per-device batch: aot's loss depends
                on train.micro_batch_size (and on which pairs share a micro-batch), unlike the others
  apo_zero      1 - sigmoid(beta cr) + sigmoid(beta rr)
  apo_down      sigmoid(beta cr) + 1 - sigmoid(beta d)
  discopop      -logsigmoid(beta d) (1 - m) + exp(-beta d) m, m = sigmoid(beta d / dpo.discopop_tau)
  sigmoid_norm  -logsigmoid(beta d'), d' as for ipo
  sft           the chosen completions' mean token NLL (`dpo.rpo_alpha` adds it with that weight: RPO)

The step's loss is sum over loss types of weight x mean over the global batch's pairs. `sft` is no pair
loss: TRL takes the mean over the tokens of its (one) batch; here the chosen tokens of the whole global
batch, so that any split of the global batch gives the same step (as for SFT), TRL's number where the
global batch is one micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")


def pair_losses(loss_type: str, chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta: float,
                eps: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair losses of one pair-defined loss type (not `sft`) from the summed log-probs of B pairs and
    their completion token counts (each [B])."""
    cr, rr = chosen - ref_chosen, rejected - ref_rejected
    d = cr - rr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type in ("ipo", "sigmoid_norm"):
        d_mean = cr / n_chosen.clamp(min=1) - rr / n_rejected.clamp(min=1)
        if loss_type == "ipo":
            return (d_mean - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * d_mean)
    if loss_type == "exo_pair":
        return (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - math.log1p(-eps))
                + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - math.log(eps)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * cr) - 0.5 * F.logsigmoid(-beta * cr) - 0.5 * F.logsigmoid(-beta * rr)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * cr) - F.logsigmoid(-beta * rr)
    if loss_type == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(chosen - rejected, dim=0)[0] - torch.sort(ref_chosen - ref_rejected, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * d)
    if loss_type == "discopop":
        logits = beta * d
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    raise ValueError(f"unknown dpo.loss_type {loss_type!r}")


def dpo_loss_sum(policy: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, beta: float,
                 losses: tuple[tuple[str, float], ...], label_smoothing: float = 0.0, discopop_tau: float = 0.05,
                 nll_scale: float = 0.0) -> torch.Tensor:
    """The summed loss of B pairs from the per-sequence log-probs of the concatenated batch ([2B]: chosen
    then rejected) and their completion token counts: sum over (loss type, weight) of weight x the summed
    pair losses; `sft`'s term is weight x `nll_scale` x the chosen completions' summed NLL (nll_scale: the
    global batch's pairs over its chosen completion tokens, so that the step's mean gives the token mean)."""
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.to(policy.dtype).chunk(2)
    n_chosen, n_rejected = n_tokens.to(policy.dtype).chunk(2)
    total = policy.new_zeros(())
    for loss_type, weight in losses:
        if loss_type == "sft":
            total = total + weight * nll_scale * -chosen.sum()
        else:
            total = total + weight * pair_losses(loss_type, chosen, rejected, ref_chosen, ref_rejected, n_chosen,
                                                 n_rejected, beta, label_smoothing, discopop_tau).sum()
    return total
