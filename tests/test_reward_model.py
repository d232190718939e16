"""The reward model (train.objective reward on data.format preference): the model it builds (a sequence
classifier, one label), margins read from data.margin_field, a model type without a classifier refused in one
line, and the loss against TRL 1.16's RewardTrainer (the anchor: same tiny model, same pairs, loss, metrics
and every gradient to 1e-5)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.data import load_tokenizer, prepare_data
from ds_finetune.errors import UserError
from ds_finetune.model import build_model
from ds_finetune.objective_config import model_head
from ds_finetune.objectives import OBJECTIVES, fingerprint_settings
from ds_finetune.objectives.reward_model import METRICS, RewardLoss, collate_rewards
from test_dpo import PAIRS, Engine
from test_orpo_cpo import _compare_grads

REWARD = ["train.objective=reward", "data.format=preference", f"data.path={PAIRS}"]
TOKENIZER = str(harness.ROOT / "assets" / "tiny-tokenizer")


def _pairs(n=8):
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    rows = [r for r in rows if isinstance(r["prompt"], str)][:n]
    return [{**r, "margin": 0.25 * (i % 3)} for i, r in enumerate(rows)]


def test_reward_is_a_registry_line_with_its_section_in_the_fingerprint_and_a_classifier_head():
    cfg = load_config(harness.TINY, [*REWARD, "reward.center_rewards_coefficient=0.01", "output_dir=x"])
    assert "reward" in OBJECTIVES and model_head(cfg) == "sequence_classification"
    assert fingerprint_settings(cfg)["reward"] == {"center_rewards_coefficient": 0.01}
    model = build_model(cfg, {})
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.score.weight.shape == (1, 64) and model.training
    torch.manual_seed(cfg.train.seed)  # the head is drawn from the seed: the same weights every build
    again = build_model(cfg, {})
    torch.manual_seed(cfg.train.seed)
    assert torch.equal(build_model(cfg, {}).score.weight, again.score.weight)


def test_the_checkpoint_config_names_the_classifier_and_the_tokenizers_pad(tmp_path):
    """What a checkpoint's hf/config.json (and so an export) says: the sequence-classification architecture
    (an inline or causal-LM config says none or the LM's) and the pad id the classifier reads."""
    from types import SimpleNamespace

    from ds_finetune.checkpoint.export import write_hf_files
    from ds_finetune.objectives import reward_model
    cfg = load_config(harness.TINY, [*REWARD, "output_dir=x"])
    model = build_model(cfg, {})
    model.config.pad_token_id = 0
    reward_model.build(SimpleNamespace(model=model, pad_id=2, cfg=cfg, data=None, layout=None,
                                       group=SimpleNamespace(dp_rank=0, rank=0, size=1), ulysses=None))
    write_hf_files(tmp_path, model, load_tokenizer(TOKENIZER))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 2
    assert config["id2label"] == {"0": "LABEL_0"}


def test_a_model_type_without_a_sequence_classifier_is_one_line(tmp_path):
    """Before anything launches (`ds-finetune train`), and in the ranks' build."""
    from test_config import invoke
    result = invoke("train", str(harness.TINY), "--dry-run", *REWARD, "model.config.model_type=codegen",
                    f"output_dir={tmp_path / 'out'}")
    assert result.exit_code != 0 and "model type 'codegen'" in result.stderr and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    cfg = load_config(harness.TINY, [*REWARD, "output_dir=x"])
    cfg.model.config = {**cfg.model.config, "model_type": "codegen"}
    with pytest.raises(UserError) as e:
        build_model(cfg, {})
    assert "AutoModelForSequenceClassification has none for model type 'codegen'" in e.value.message
    assert "\n" not in e.value.message


def test_margins_come_from_data_margin_field_and_a_bad_one_is_one_line(tmp_path):
    rows = _pairs(4)
    path = harness.write_jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = [*REWARD, f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "output_dir=x"]
    tok = load_tokenizer(TOKENIZER)
    assert prepare_data(load_config(harness.TINY, overrides).data, tok).row_margins is None  # unset: none read
    data = prepare_data(load_config(harness.TINY, [*overrides, "data.margin_field=margin"]).data, tok)
    assert list(data.row_margins) == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.0, 0.0]
    batch = collate_rewards(data, np.array([[2, 3], [4, 5]]), 2)
    assert batch.margin.tolist() == [0.25, 0.5] and batch.input_ids.size(0) == 4
    rows[1]["margin"] = "big"
    harness.write_jsonl(path, rows)
    with pytest.raises(UserError) as e:
        prepare_data(load_config(harness.TINY, [*overrides, "data.margin_field=margin"]).data, tok)
    assert "pairs.jsonl:2" in e.value.message and "not a finite number" in e.value.message
    assert "\n" not in e.value.message


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.05)])
def test_loss_metrics_and_gradients_equal_trl_reward_trainer(tmp_path, margin, center):
    """TRL's RewardTrainer.compute_loss on its own collated batch against our RewardLoss on the same tokens:
    the loss, accuracy, margin and mean_reward to 1e-5, every gradient to 1e-5."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    tok = load_tokenizer(TOKENIZER)
    cfg = load_config(harness.TINY, [*REWARD, "output_dir=x"])
    torch.manual_seed(0)
    model = build_model(cfg, {})
    model.config.pad_token_id = tok.pad_token_id
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a head off its init: rewards that differ
        model.score.weight.add_(torch.randn(model.score.weight.shape, generator=g))
    ours = copy.deepcopy(model)
    rows = _pairs() if margin else [{k: v for k, v in r.items() if k != "margin"} for r in _pairs()]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(rows),
                            use_cpu=True, dataloader_num_workers=0, bf16=False, max_length=None,
                            center_rewards_coefficient=center)
    trainer = trl.RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    assert isinstance(trainer.model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("margin" in batch) == margin
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    pairs = len(rows)
    loss_sum, sums = RewardLoss(center)(Engine(ours), batch["input_ids"], batch["attention_mask"],
                                        batch.get("margin"))
    (loss_sum / pairs).backward()
    assert (loss_sum / pairs).item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert set(trl_metrics) - set(METRICS) == {"min_reward", "max_reward", "num_tokens"}
    for name, value in zip(METRICS, (sums / pairs).tolist()):
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert 0 < trl_metrics["accuracy"] < 1 and trl_metrics["margin"] != 0
    _compare_grads(ours, trainer.model)


def test_packing_is_taken_and_refused_only_under_sequence_parallelism():
    assert load_config(harness.TINY, [*REWARD, "data.packing=true", "output_dir=x"]).data.isolates
    with pytest.raises(UserError, match="data.packing with train.sequence_parallel > 1 is not supported with "
                                        "train.objective reward") as e:
        load_config(harness.TINY, [*REWARD, "data.packing=true", "train.sequence_parallel=2", "output_dir=x"])
    assert "\n" not in e.value.message


@pytest.mark.parametrize("pad", ["own", "eos"])
def test_packed_pairs_are_scored_at_each_sequences_end_as_the_padded_batch(tmp_path, pad):
    """data.packing isolated: a micro-batch's sequences packed into rows of at most data.max_length tokens, each
    scored at its own last token (the head's per-position scores, not transformers' one score a row), give the
    padded batch's loss, metrics and every gradient within 1e-5; also where the pad token is eos (Qwen's base
    models), whose padded rows transformers scores at the token before their eos."""
    from ds_finetune.data import EpochOrder
    from ds_finetune.objectives.reward_model import PositionScores
    cfg = load_config(harness.TINY, [*REWARD, "data.max_length=64", "model.config.attention_dropout=0.0",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output_dir=x"])
    tok = load_tokenizer(TOKENIZER)
    data = prepare_data(cfg.data, tok)
    units = EpochOrder(data, 1, False, 64).units(0)[:6]
    pad_id = tok.eos_token_id if pad == "eos" else tok.pad_token_id
    ends_in_pad = [data.row(int(r))[0][-1] == pad_id for r in units.reshape(-1)]
    assert any(ends_in_pad) == (pad == "eos")  # the rule is at work: rows that end in the pad token
    torch.manual_seed(0)
    model = build_model(cfg, {})
    model.config.pad_token_id = pad_id
    with torch.no_grad():  # a head off its init: rewards that differ
        model.score.weight.add_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(5)))
    results = []
    for pack in (None, 64):
        scored = copy.deepcopy(model)
        loss_fn = RewardLoss(None, positions=PositionScores(scored), pack_length=pack)
        batch = loss_fn.collate(data, units, pad_id)
        if pack:  # 12 sequences in fewer rows, each read at its own end
            assert batch.attention_mask is None and batch.input_ids.size(0) < 12 and len(batch.ends) == 12
        loss_sum, sums = loss_fn(Engine(scored), *batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), sums, [p.grad for p in scored.parameters()]))
    (loss, sums, grads), (p_loss, p_sums, p_grads) = results
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_sums, sums, rtol=1e-5, atol=1e-5)
    assert 0 < sums[0] < 6 and sums[1] != 0  # some pairs ranked right, some wrong: the rewards differ
    for a, b in zip(p_grads, grads):  # other matmul shapes: float noise in proportion to each gradient's size
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_a_lora_reward_model_trains_its_head_with_the_adapters_and_exports_the_classifier(tmp_path):
    """model.lora with train.objective reward: peft's sequence-classification task (TRL's RewardTrainer with a
    peft config), so the head is trained whole beside the adapters; the loss against TRL with the same peft
    config to 1e-5; the adapter checkpoint's merged export loads as a classifier that scores as the trained
    model does, and the adapter export names the task."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from ds_finetune import lora
    from ds_finetune.checkpoint.export import write_hf_files
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    base = harness.save_tiny_model(tmp_path / "base", seed=3)
    tok = load_tokenizer(TOKENIZER)
    cfg = load_config(harness.TINY, [*REWARD, "model.config=null", f"model.name_or_path={base}", "model.lora.r=4",
                                     "model.lora.alpha=8", "output_dir=x"])
    torch.manual_seed(0)
    model = build_model(cfg, {})
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    model.config.pad_token_id = tok.pad_token_id
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # adapters and head off their init: the export must carry both
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()  # the saved base's dropout off: two forwards to compare
    ours = copy.deepcopy(model)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=8,
                            use_cpu=True, dataloader_num_workers=0, bf16=False, max_length=None)
    trainer = trl.RewardTrainer(model=model, args=args, processing_class=tok,
                                train_dataset=Dataset.from_list([{k: v for k, v in r.items() if k != "margin"}
                                                                 for r in _pairs()]))
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    loss_sum, _ = RewardLoss(None)(Engine(ours), batch["input_ids"], batch["attention_mask"], None)
    (loss_sum / 8).backward()
    assert (loss_sum / 8).item() == pytest.approx(trl_loss.item(), abs=1e-5)
    _compare_grads(ours, trainer.model)

    hf_dir, state = tmp_path / "ckpt" / "hf", dict(ours.named_parameters())
    write_hf_files(tmp_path / "ckpt", ours, tok)
    names = [n for n in state if state[n].requires_grad]
    merged = lora.export_merged(hf_dir, tmp_path / "merged", names, lambda n: state[n].detach(), torch.float32,
                                None, 5 * 10**9)
    classifier = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        want = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    adapter = lora.export_adapter(hf_dir, tmp_path / "adapter", names, lambda n: state[n].detach(), torch.float32)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
