"""The config sections of the objectives (`dpo:`, `orpo:`, `simpo:`, `cpo:`, `kto:`, `reward:`, `grpo:` and its
`rewards:`), each named like its objective (objectives/__init__.py); config.py holds them in the run config."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from ds_finetune.config_text import Section


DpoLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]


class DpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: rewards are beta x (policy - reference) log-probs.")
    loss_type: Union[DpoLossType, list[DpoLossType]] = Field(
        "sigmoid", description="TRL's DPO loss, or a list of them added with loss_weights: sigmoid | hinge | ipo | "
                               "exo_pair | nca_pair | robust | bco_pair | sppo_hard | aot | apo_zero | apo_down | "
                               "discopop | sigmoid_norm | sft (docs/design.md#preference-tuning-dpo).")
    loss_weights: Optional[list[float]] = Field(
        None, description="One weight per loss_type entry (default: 1 each).")
    rpo_alpha: Optional[float] = Field(
        None, ge=0, description="RPO: add the chosen completions' mean token NLL with this weight (TRL's sft loss).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="The probability that a pair's labels are flipped: sigmoid (cDPO), robust, "
                                       "aot; exo_pair's epsilon (must be > 0 there).")
    discopop_tau: float = Field(0.05, gt=0, description="discopop: the temperature of its mixing coefficient.")
    reference: Literal["precomputed", "model"] = Field(
        "precomputed", description="Full fine-tuning: the base's log-probs computed once before training "
                                   "(precomputed) or by a frozen copy of the base run beside the policy (model; "
                                   "ZeRO 3 partitions it too). With LoRA the base is the model with adapters off.")

    @model_validator(mode="after")
    def _losses(self):
        types = self.loss_types
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"dpo.loss_weights has {len(self.loss_weights)} entries for {len(types)} dpo.loss_type "
                             f"entries; give one weight per loss type")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ValueError("dpo.loss_type exo_pair needs dpo.label_smoothing > 0 (its epsilon; the EXO paper uses "
                             "1e-3)")
        return self

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weighted_losses(self) -> tuple[tuple[str, float], ...]:
        """((loss type, weight), ...) of the step's loss, rpo_alpha's NLL term last."""
        weights = self.loss_weights or [1.0] * len(self.loss_types)
        rpo = [("sft", self.rpo_alpha)] if self.rpo_alpha else []
        return tuple([*zip(self.loss_types, weights), *rpo])

    def fingerprint(self) -> dict:
        """The section as the resume fingerprint has it: fields added since DPO's first release only where
        set, so that a checkpoint of that release still matches."""
        added = {"loss_weights": None, "rpo_alpha": None, "discopop_tau": 0.05}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in added or v != added[k]}


class OrpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="ORPO's lambda (TRL's beta): the weight of the odds-ratio term beside "
                                               "the chosen sequences' NLL.")


class CpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="CPO temperature: rewards are beta x the policy's log-probs.")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid (CPO) | hinge | ipo | simpo (ipo and simpo on per-token mean log-probs).")
    alpha: float = Field(1.0, ge=0, description="The weight of the chosen completions' mean token NLL (TRL's "
                                                "cpo_alpha; 0: none).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid and simpo: the probability that a pair's "
                                                                  "labels are flipped.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin.")


class SimpoConfig(Section):
    beta: float = Field(2.0, gt=0, description="SimPO temperature: rewards are beta x the per-token mean log-probs.")
    gamma: float = Field(1.0, ge=0, description="The target reward margin (TRL's simpo_gamma).")
    alpha: float = Field(0.0, ge=0, description="The weight of the chosen completions' mean token NLL (CPO-SimPO; "
                                                "0: SimPO).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="The probability that a pair's labels are flipped.")


class KtoConfig(Section):
    beta: float = Field(0.1, gt=0, description="KTO temperature: rewards are beta x (policy - reference) log-probs.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (against the KL estimate of mismatched pairs) | apo_zero_unpaired (no KL estimate).")
    desirable_weight: float = Field(1.0, gt=0, description="The weight of the desirable rows' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="The weight of the undesirable rows' losses.")
    reference: Literal["precomputed", "model"] = Field(
        "precomputed", description="As dpo.reference: the base's log-probs computed once before training "
                                   "(precomputed) or by a frozen copy of the base (model); with LoRA the base is the "
                                   "model with adapters off.")


class RewardConfig(Section):
    center_rewards_coefficient: Optional[float] = Field(
        None, ge=0, description="Add this x the mean squared sum of a pair's two rewards, pulling rewards towards "
                                "0 (TRL's center_rewards_coefficient; None: off).")


PAIR_OBJECTIVES = ("dpo", "orpo", "simpo", "cpo", "reward")
# The objectives that need a reference model (and take dpo's three ways of getting one).
REFERENCE_OBJECTIVES = ("dpo", "kto")


# What the model of an objective is, where it is not a causal LM (model.py builds it with transformers' Auto
# class of that head): the reward model is a sequence classifier with one label.
MODEL_HEADS = {"reward": "sequence_classification"}


def model_head(cfg) -> str:
    """"causal_lm" or "sequence_classification": the head the run's objective trains."""
    return MODEL_HEADS.get(cfg.train.objective, "causal_lm")


class GrpoConfig(Section):
    """GRPO's settings, with TRL's GRPOConfig names, meanings and defaults (docs/design.md, GRPO)."""
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt, scored as one group (>= 2: "
                                                      "a group of one has no baseline).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the loss's log-probs use it too (as TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                                                      "probability reaches top_p (1: all).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: all).")
    max_completion_length: int = Field(512, ge=1, description="Tokens a completion may have (eos included); a "
                                                              "completion stopped here is truncated (clipped).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="grpo (each completion's token mean) | dr_grpo (a sum over max_completion_length) | dapo "
                            "(the global batch's token mean) | bnpo (each micro-batch's token mean).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantages = reward - the group's mean, divided by the group's std (group), the "
                             "global batch's std (batch) or nothing (none).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping: the ratio is clipped below at 1 - epsilon.")
    epsilon_high: Optional[float] = Field(None, gt=0, description="Clipping above at 1 + epsilon_high (default "
                                                                  "epsilon; DAPO's clip-higher uses 0.28).")
    num_iterations: int = Field(1, ge=1, description="μ: optimizer steps per generation; steps after a block's first "
                                                     "reuse its completions against the old policy's log-probs.")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (0: no reference; > 0: the base with "
                                               "LoRA's adapters off, else a frozen copy of the base).")
    use_bias_correction_kl: bool = Field(True, description="beta > 0: the KL term times the importance ratio (TRL's "
                                                           "default; the unbiased reverse-KL gradient).")
    mask_truncated_completions: bool = Field(False, description="Leave completions that hit max_completion_length out "
                                                                "of the loss.")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class RewardFunctionConfig(Section):
    """One entry of `rewards:` (train.objective grpo)."""
    name: Optional[str] = Field(None, description="Its metric name (rewards/NAME/mean); default the function's name.")
    function: str = Field(..., description="A built-in (accuracy | format), module:callable (importable from the "
                                           "config file's folder or the Python path; called as TRL calls reward "
                                           "functions: (prompts, completions, **columns) -> a float or None each), "
                                           "or model:PATH (a reward model folder: train.objective reward's export).")
    weight: float = Field(1.0, allow_inf_nan=False, description="Its weight in the summed reward.")
    pattern: Optional[str] = Field(None, description="format: the regex a completion must match in full (default "
                                                     "<think>...</think><answer>...</answer>).")

    @model_validator(mode="after")
    def _named(self):
        if self.name is None:  # a function's name, or a reward model's folder name (as TRL names it)
            model = self.function.startswith("model:")
            self.name = self.function.rstrip("/").rsplit("/" if model else ":", 1)[-1].removeprefix("model:")
        if self.pattern is not None and self.function != "format":
            raise ValueError(f"rewards: pattern is a setting of the format reward, not of {self.function}")
        return self
