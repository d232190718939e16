"""The objective seam: every `train.objective` choice has a module in the registry whose objective satisfies
the `Objective` protocol, and what a step reports reaches metrics.jsonl through one channel."""

import typing

import torch

from ds_finetune.config import TrainConfig
from ds_finetune.objectives import OBJECTIVES, Objective, StepResult
from ds_finetune.objectives import cpo, dpo, orpo
from ds_finetune.objectives.pairs import PairObjective
from ds_finetune.objectives.sft import SFT
from ds_finetune.train import agree_on_step


def test_every_objective_choice_is_registered_and_nothing_else():
    choices = typing.get_args(TrainConfig.model_fields["objective"].annotation)
    assert sorted(OBJECTIVES) == sorted(choices)


def test_sft_and_the_pair_objectives_satisfy_the_objective_protocol():
    sft = SFT(None, None, None, 0, False, 0)
    pair_objectives = [PairObjective(module.METRICS, None, None, None, 0, 0) for module in (dpo, orpo, cpo)]
    assert isinstance(sft, Objective) and all(isinstance(o, Objective) for o in pair_objectives)
    assert not isinstance(object(), Objective)  # the check can fail
    assert sft.perplexity and not any(o.perplexity for o in pair_objectives)
    assert all("rewards/margins" in o.metric_names for o in pair_objectives)
    assert "log_odds_chosen" in pair_objectives[1].metric_names


def test_a_step_result_becomes_metrics_by_sum_over_count_and_a_zero_count_logs_nothing(one_rank_group):
    result = StepResult(torch.tensor(6.0, dtype=torch.float64), 4,
                        sums={"loss/a": (torch.tensor(3.0), 2), "loss/b": (torch.tensor(0.0), 0)},
                        counts={"tokens/a": 2, "tokens/b": 0})
    outcome = agree_on_step(result, signum=0, time_to_save=False, writing=False)
    assert outcome.loss == 1.5 and not outcome.stop
    assert outcome.metrics == {"loss/a": 1.5, "tokens/a": 2, "tokens/b": 0}
