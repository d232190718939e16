"""The objective seam: every `train.objective` choice has a module in the registry whose objective satisfies
the `Objective` protocol, and what a step reports reaches metrics.jsonl through one channel; and, in real
runs, KTO and the reward model killed at ZeRO 3 resume bitwise (ORPO's: test_orpo_cpo.py)."""

import typing

import pytest
import torch

import harness

from ds_finetune.config import TrainConfig
from ds_finetune.objectives import OBJECTIVES, Objective, StepResult
from ds_finetune.objectives import cpo, dpo, kto, orpo, reward_model
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
    kto_objective = kto.KTOObjective(None, None, None, 0, 0, 1, 8, 2)
    reward = PairObjective(reward_model.METRICS, None, None, None, 0, 0)
    assert isinstance(kto_objective, Objective) and isinstance(reward, Objective)
    assert not kto_objective.perplexity and "kl" in kto_objective.metric_names and "accuracy" in reward.metric_names


def test_a_step_result_becomes_metrics_by_sum_over_count_and_a_zero_count_logs_nothing(one_rank_group):
    result = StepResult(torch.tensor(6.0, dtype=torch.float64), 4,
                        sums={"loss/a": (torch.tensor(3.0), 2), "loss/b": (torch.tensor(0.0), 0)},
                        counts={"tokens/a": 2, "tokens/b": 0})
    outcome = agree_on_step(result, signum=0, time_to_save=False, writing=False)
    assert outcome.loss == 1.5 and not outcome.stop
    assert outcome.metrics == {"loss/a": 1.5, "tokens/a": 2, "tokens/b": 0}


# ------------------------------------------------------------------------------------------ real runs

UNPAIRED = harness.ROOT / "data" / "tiny" / "unpaired_preference.jsonl"
PAIRS = harness.ROOT / "data" / "tiny" / "preference.jsonl"
RUNS = {  # harness.BASE: 2 ranks, micro-batch 2, grad_accum 2, dropout on, a checkpoint every step
    "kto": ["train.objective=kto", "data.format=unpaired_preference", f"data.path={UNPAIRED}", "kto.beta=0.2",
            "eval.fraction=0.05", "eval.every_steps=3",  # the precomputed reference; evaluation's own KL
            "data.packing=isolated"],  # its rows, and apart its KL rows, packed
    "reward": ["train.objective=reward", "data.format=preference", f"data.path={PAIRS}",
               "reward.center_rewards_coefficient=0.01"],
}
METRICS = {"kto": kto.METRICS, "reward": reward_model.METRICS}


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", sorted(RUNS))
def test_kto_and_reward_zero3_killed_mid_accumulation_resume_bitwise(tmp_path, reference_run, objective):
    """Two ranks, ZeRO-3, full fine-tuning (KTO's rows packed: data.packing isolated): SIGKILL on rank 1 inside
    step 5's accumulation, --resume from step 4: the uninterrupted run's losses, the objective's metrics (and
    KTO's eval metrics), samples and final weights, bitwise. The reward model's last checkpoint exports to a
    folder AutoModelForSequenceClassification loads, with the trained weights."""
    overrides = ["train.zero_stage=3", *RUNS[objective]]
    ref = reference_run(3, extra=tuple(overrides))
    got = tmp_path / "got"
    harness.kill_in_step5(got, overrides)
    harness.assert_resumed(harness.train(got, overrides, resume="auto"), step=4)
    harness.assert_same_run(got, ref)
    harness.assert_same_metrics(got, ref, [*METRICS[objective], *(f"eval_{n}" for n in ("loss", *METRICS[objective]))])
    rows = harness.metrics(got)
    assert rows[-1]["loss"] != rows[0]["loss"]  # it trained
    if objective == "kto":
        assert all("kl" in r and "rewards/chosen" in r for r in rows) and rows[2]["eval_kl"] >= 0
        assert any(r.get("rewards/margins", 0) != 0 for r in rows)
    else:
        assert rows[-1]["margin"] != 0 and 0 <= rows[-1]["accuracy"] <= 1
        _assert_reward_model_exports(got, tmp_path / "export")
    harness.assert_same_final_weights(got, ref)


def _assert_reward_model_exports(run_dir, out_dir):
    from transformers import AutoModelForSequenceClassification

    from ds_finetune.checkpoint.verify import find_resumable_checkpoint
    from test_config import invoke  # in this process: this checkout's CLI
    info, _ = find_resumable_checkpoint(run_dir / "checkpoints")
    result = invoke("ckpt", "export", str(info.path), str(out_dir))
    assert result.exit_code == 0 and "AutoModelForSequenceClassification.from_pretrained" in result.stdout, result.output
    model = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == 2  # the tokenizer's: the classifier scores the last token that is not it
    weights = harness.consolidate(info, weights_only=True)[0]["weights"]
    got = dict(model.named_parameters())
    assert got.keys() == weights.keys() and "score.weight" in got
    for name, value in weights.items():
        assert torch.equal(got[name].detach(), value), name
    rewards = model(torch.tensor([[5, 6, 7, 1, 2, 2]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
    assert rewards.shape == (1, 1) and torch.isfinite(rewards).all()
