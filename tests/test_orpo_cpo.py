"""ORPO, CPO and SimPO (pairs without a reference): config, the loss against TRL's ORPOTrainer and CPOTrainer
(`trl.experimental`, the anchors: same tiny model, same batch, loss, every metric and gradients to 1e-5) and, in a
real run, ORPO's kill-and-resume at ZeRO 3."""
from __future__ import annotations

import copy

import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.data import IGNORE_INDEX, load_tokenizer
from ds_finetune.errors import UserError
from ds_finetune.loss import ChunkedLoss, full_sequence_logps, full_token_logps
from ds_finetune.objectives import OBJECTIVES, fingerprint_settings
from ds_finetune.objectives.cpo import CPOLoss
from ds_finetune.objectives.orpo import METRICS as ORPO_METRICS, ORPOLoss, with_chosen_prompts
from test_dpo import PAIRS, Engine, _trl_pairs
from harness import tiny_model


def pairs_run(objective):
    return [f"train.objective={objective}", "data.format=preference", f"data.path={PAIRS}"]


# ------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("objective", ["orpo", "simpo", "cpo"])
def test_each_pair_objective_is_a_registry_line_with_its_section_in_the_fingerprint(objective):
    cfg = load_config(harness.TINY, [*pairs_run(objective), f"{objective}.beta=0.25", "output_dir=x"])
    assert objective in OBJECTIVES
    settings = fingerprint_settings(cfg)
    assert settings["train.objective"] == objective and settings[objective]["beta"] == 0.25
    with pytest.raises(UserError, match=f"train.objective {objective} needs data.format preference"):
        load_config(harness.TINY, [f"train.objective={objective}", "output_dir=x"])
    # isolated packing works (test_dpo); shared would let a pair's rows attend to each other
    assert load_config(harness.TINY, [*pairs_run(objective), "data.packing=true", "output_dir=x"]).data.isolates
    with pytest.raises(UserError, match="data.packing shared would let the sequences of a pack attend"):
        load_config(harness.TINY, [*pairs_run(objective), "data.packing=shared", "output_dir=x"])


# -------------------------------------------------------------------------------------- against TRL

def _tiny_pair(seed=3):
    """(a TRL-free tiny model, the same one nudged off its init) — policy weights that give nonzero margins."""
    model = tiny_model("model.config.attention_dropout=0.0")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _compare_grads(ours, theirs):
    trl_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trl_grads.keys() == our_grads.keys() and trl_grads
    worst = 0.0
    for n in trl_grads:
        torch.testing.assert_close(our_grads[n], trl_grads[n], atol=1e-5, rtol=1e-5, msg=n)
        worst = max(worst, float((our_grads[n] - trl_grads[n]).abs().max()))
    return worst


def _trl_batch(trainer_cls, args, model, tok):
    from datasets import Dataset
    trainer = trainer_cls(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(_trl_pairs()))
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    pad = getattr(trainer, "padding_value", None) or getattr(trainer, "pad_token_id", 0)  # ORPO | CPO
    cat = trainer.concatenated_inputs(batch, padding_value=pad)
    return loss, metrics, cat["concatenated_input_ids"], cat["concatenated_attention_mask"], cat["concatenated_labels"]


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(_trl_pairs()),
               use_cpu=True, dataloader_num_workers=0, bf16=False, max_length=512, remove_unused_columns=False, **kw)


@pytest.mark.parametrize("chunk", [5, 0])
def test_orpo_loss_metrics_and_gradients_equal_trl_orpo_trainer(tmp_path, chunk):
    """TRL's ORPOTrainer.compute_loss on its own collated batch against our ORPOLoss on the same tokens (the
    chunked head, and the full logits): the loss and its nine logged metrics but logits/* to 1e-5, every
    parameter's gradient to 1e-5."""
    orpo = pytest.importorskip("trl.experimental.orpo")
    tok = load_tokenizer(str(harness.ROOT / "assets" / "tiny-tokenizer"))
    theirs, ours = _tiny_pair(), None
    ours = copy.deepcopy(theirs)
    loss, metrics, input_ids, attention_mask, labels = _trl_batch(
        orpo.ORPOTrainer, _args(orpo.ORPOConfig, tmp_path, beta=0.3), theirs, tok)
    batch = with_chosen_prompts(input_ids, attention_mask, labels)
    token_logps = ChunkedLoss(ours, chunk).token_logps if chunk else full_token_logps
    loss_sum, sums = ORPOLoss(token_logps, 0.3)(Engine(ours), *batch)
    pairs = input_ids.size(0) // 2
    (loss_sum / pairs).backward()
    assert (loss_sum / pairs).item() == pytest.approx(loss.item(), abs=1e-5)
    assert set(metrics) - set(ORPO_METRICS) == {"logits/chosen", "logits/rejected"}
    for name, value in zip(ORPO_METRICS, (sums / pairs).tolist()):
        assert value == pytest.approx(metrics[name], abs=1e-5), name
    assert metrics["rewards/margins"] != 0 and metrics["nll_loss"] > 0
    _compare_grads(ours, theirs)


CPO_CASES = [("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("simpo", {"simpo_gamma": 0.7}),
             ("sigmoid", {"label_smoothing": 0.1, "cpo_alpha": 0.0}), ("simpo", {"cpo_alpha": 0.0, "beta": 2.0})]


@pytest.mark.parametrize("loss_type, extra", CPO_CASES)
def test_cpo_and_simpo_loss_metrics_and_gradients_equal_trl_cpo_trainer(tmp_path, loss_type, extra):
    """TRL's CPOTrainer against our CPOLoss (train.objective cpo; simpo is its loss_type simpo with cpo_alpha
    0 by default): the loss, TRL's metrics but logits/* (nll_loss where cpo_alpha > 0: TRL logs 0 without it)
    and every gradient to 1e-5."""
    cpo = pytest.importorskip("trl.experimental.cpo")
    tok = load_tokenizer(str(harness.ROOT / "assets" / "tiny-tokenizer"))
    theirs = _tiny_pair()
    ours = copy.deepcopy(theirs)
    settings = {"beta": 0.1, "cpo_alpha": 1.0, "label_smoothing": 0.0, "simpo_gamma": 0.5, **extra}
    loss, metrics, input_ids, attention_mask, labels = _trl_batch(
        cpo.CPOTrainer, _args(cpo.CPOConfig, tmp_path, loss_type=loss_type, **settings), theirs, tok)
    loss_fn = CPOLoss(ChunkedLoss(ours, 5).sequence_logps, loss_type, settings["beta"], settings["cpo_alpha"],
                      settings["label_smoothing"], settings["simpo_gamma"])
    loss_sum, sums = loss_fn(Engine(ours), input_ids, attention_mask, labels, None)
    pairs = input_ids.size(0) // 2
    (loss_sum / pairs).backward()
    assert (loss_sum / pairs).item() == pytest.approx(loss.item(), abs=1e-5)
    assert set(metrics) - set(loss_fn.metric_names) == {"logits/chosen", "logits/rejected"} | (
        set() if settings["cpo_alpha"] else {"nll_loss"})
    for name, value in zip(loss_fn.metric_names, (sums / pairs).tolist()):
        assert value == pytest.approx(metrics[name], abs=1e-5), name
    assert metrics["rewards/margins"] != 0
    _compare_grads(ours, theirs)


def test_orpo_chosen_nll_runs_over_the_prompt_too():
    """The chosen rows' labels become every attended token; the rejected rows' stay the completion; the
    completion flags pick exactly the completion targets (checked against full-logit sums)."""
    model = tiny_model("model.config.attention_dropout=0.0")
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 512, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(torch.arange(12) < 5, IGNORE_INDEX).masked_fill(attention_mask == 0, IGNORE_INDEX)
    batch = with_chosen_prompts(input_ids, attention_mask, labels)
    assert batch.facts.row_targets() == [11, 8, 7, 7] and list(batch.completion_counts) == [7, 4, 7, 7]
    tokens = ChunkedLoss(model, 4).token_logps(model, batch.input_ids, batch.attention_mask, batch.labels, batch.facts)
    completion = torch.stack([part.sum() for part in torch.split(tokens * batch.completion, [11, 8, 7, 7])])
    assert torch.allclose(completion, full_sequence_logps(model, input_ids, attention_mask, labels), atol=1e-5)


# ------------------------------------------------------------------------------------------ real runs

ORPO3 = [*pairs_run("orpo"), "train.zero_stage=3", "orpo.beta=0.2"]


@pytest.mark.multiproc
def test_orpo_zero3_killed_mid_accumulation_resumes_bitwise(tmp_path, reference_run):
    """Two ranks, ZeRO-3, full fine-tuning, dropout on (harness.BASE): SIGKILL on rank 1 inside step 5's
    accumulation, --resume from step 4: the uninterrupted run's losses, ORPO metrics, samples and final
    weights, bitwise."""
    ref = reference_run(3, extra=tuple(ORPO3))
    got = tmp_path / "got"
    harness.kill_in_step5(got, ORPO3)
    harness.assert_resumed(harness.train(got, ORPO3, resume="auto"), step=4)
    harness.assert_same_run(got, ref)
    harness.assert_same_metrics(got, ref, ORPO_METRICS)
    rows = harness.metrics(got)
    assert all(name in r for r in rows for name in ORPO_METRICS)
    assert rows[-1]["loss"] != rows[0]["loss"] and rows[-1]["rewards/margins"] != 0  # it trained
    harness.assert_same_final_weights(got, ref)
