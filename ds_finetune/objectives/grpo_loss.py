"""GRPO's math, as TRL 1.16's GRPOTrainer computes it (`_generate_and_score_completions`, `_compute_loss`);
names and formulas follow it, tests/test_grpo.py holds them against it to 1e-5.

Advantages (`advantages`): rewards_per_func [N, F] (NaN where a function returned None) weighted and summed
(nansum; NaN where every function returned None); A = r - mean of its group of G (nanmean), divided by
std + 1e-4 (Bessel-corrected nanstd) of its group (`scale_rewards: group`), of the global batch (`batch`),
or not divided (`none`); NaN advantages (unscorable completions) become 0.

Per-token loss (`token_losses`): ratio = exp(logp - old_logp); -min(ratio A, clip(ratio, 1 - epsilon,
1 + epsilon_high) A), plus beta (exp(ref - logp) - (ref - logp) - 1) where beta > 0, times the ratio with
use_bias_correction_kl (TRL's default). With one step per
generation (num_iterations 1) old_logp is logp detached: the ratio is 1 and only its gradient counts.

Reduction of a micro-batch (`micro_batch_loss`) to a sum that the step divides by `normaliser`:
  grpo     each completion's token mean, summed             / completions of the global batch
  bnpo     the micro-batch's token mean x its completions   / completions  (TRL: the mean of micro-batch means)
  dr_grpo  the token sum / max_completion_length            / completions
  dapo     the token sum                                    / the global batch's completion tokens
Tokens are flat (a micro-batch's completion tokens row-major, `rows[i]` the completion of token i).
"""

from __future__ import annotations

import torch

TOKEN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's nanstd: Bessel-corrected, NaN ignored (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=x.dtype))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def summed_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each completion's rewards (nansum), NaN where every function returned None."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


def advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group: int, scale_rewards: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, whether its group's (or the batch's) reward std is zero) of a batch
    whose completions come in groups of `group` consecutive ones."""
    rewards = summed_rewards(rewards_per_func, weights)
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # group, and none (whose std only feeds frac_reward_zero_std)
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def reward_metrics(rewards_per_func: torch.Tensor, weights: torch.Tensor, names: list[str], is_std_zero: torch.Tensor
                   ) -> dict:
    """TRL's reward metrics of the whole global batch."""
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        out[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    rewards = summed_rewards(rewards_per_func, weights)
    out["reward"] = torch.nanmean(rewards).item()
    out["reward_std"] = nanstd(rewards).item()
    out["frac_reward_zero_std"] = is_std_zero.float().mean().item()
    return out


def length_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict:
    """TRL's completions/* of the whole global batch (lengths with the eos; truncated: hit the limit)."""
    lengths = lengths.float()
    terminated = lengths[~truncated]
    if terminated.numel() == 0:
        terminated = torch.zeros(1, device=lengths.device)
    return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item(),
            "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item()}


def token_losses(logps, old_logps, ref_logps, token_advantages, epsilon_low: float, epsilon_high: float,
                 beta: float, bias_correction_kl: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(per-token loss, its per-token KL (None where beta is 0), the per-token values of the clip metrics).
    `bias_correction_kl` (TRL's use_bias_correction_kl, default on): the KL times the ratio, whose gradient
    is then the unbiased reverse-KL gradient (DeepSeek-V3.2); it is logged so too."""
    old_logps = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(coef_1 * token_advantages, coef_2 * token_advantages)
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + beta * kl
    with torch.no_grad():
        low = (coef_1 < 1 - epsilon_low) & (token_advantages < 0)
        high = (coef_1 > 1 + epsilon_high) & (token_advantages > 0)
        clips = {"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
                 "clip_ratio/region_mean": (low | high).float()}
    return per_token, kl, clips


def micro_batch_loss(per_token: torch.Tensor, rows: torch.Tensor, completions: int, loss_type: str,
                     max_completion_length: int) -> torch.Tensor:
    """The micro-batch's loss as a sum over its completions (see the module docstring's table)."""
    if loss_type == "grpo":
        sums = torch.zeros(completions, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
        # not bincount: on CUDA it reads its input's min and max back to the host, a sync a micro-step
        counts = torch.zeros_like(sums).index_add(0, rows, torch.ones_like(per_token)).clamp(min=1)
        return (sums / counts).sum()
    if loss_type == "bnpo":
        return per_token.sum() / max(per_token.numel(), 1) * completions
    if loss_type == "dr_grpo":
        return per_token.sum() / max_completion_length
    return per_token.sum()  # dapo


def token_metric_sums(kl, entropy, clips: dict) -> torch.Tensor:
    """The micro-batch's sums of TOKEN_METRICS and its token count, one float64 vector (no graph)."""
    with torch.no_grad():
        n = clips["clip_ratio/low_mean"].numel()
        device = clips["clip_ratio/low_mean"].device
        kl_sum = kl.detach().sum() if kl is not None else torch.zeros((), device=device)
        return torch.stack([kl_sum.float(), entropy.sum().float(), *(clips[k].sum() for k in TOKEN_METRICS[2:]),
                            torch.full((), float(n), device=device)]).double()  # torch.tensor: a blocking copy


def token_metrics(per_micro_batch: torch.Tensor, beta: float) -> dict:
    """TRL's loss-time metrics from every rank's summed [micro-batch, TOKEN_METRICS + count] sums: each
    micro-batch's global masked mean, averaged over the micro-batches (TRL logs one a micro-step and
    averages them). kl only where beta > 0."""
    counts = per_micro_batch[:, -1].clamp(min=1.0)
    means = (per_micro_batch[:, :-1] / counts[:, None]).mean(0).tolist()
    return {name: value for name, value in zip(TOKEN_METRICS, means) if name != "kl" or beta != 0.0}
