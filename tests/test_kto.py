"""KTO (train.objective kto on data.format unpaired_preference): config, the data (labels, the KL rows as TRL
builds them) and the loss against TRL 1.16's KTOTrainer (the anchor: same tiny model, same rows, loss, every
metric it logs that we log and every gradient to 1e-5) with each of the three references."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.data import EpochOrder, HostFacts, load_tokenizer, prepare_data, prepare_training_data
from ds_finetune.errors import UserError
from ds_finetune.loss import ChunkedLoss
from ds_finetune.objectives import OBJECTIVES, fingerprint_settings
from ds_finetune.objectives.dpo import AdaptersOff, Precomputed
from ds_finetune.objectives.kto import METRICS, KTOBatch, KTOLoss, KTOObjective, collate_kto, kl_partners
from harness import tiny_model
from test_dpo import Engine
from test_orpo_cpo import _compare_grads

UNPAIRED = harness.ROOT / "data" / "tiny" / "unpaired_preference.jsonl"
KTO = ["train.objective=kto", "data.format=unpaired_preference", f"data.path={UNPAIRED}"]
TOKENIZER = str(harness.ROOT / "assets" / "tiny-tokenizer")


def _rows(n=12):
    rows = [json.loads(line) for line in UNPAIRED.read_text().splitlines()]
    return [r for r in rows if isinstance(r["prompt"], str)][:n]


def _data(tmp_path, rows, *overrides):
    path = harness.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = load_config(harness.TINY, ["train.objective=kto", "data.format=unpaired_preference", f"data.path={path}",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output_dir=x", *overrides])
    return cfg, prepare_data(cfg.data, load_tokenizer(TOKENIZER))


# ------------------------------------------------------------------------------------------- config

def test_kto_is_a_registry_line_with_its_section_in_the_fingerprint():
    cfg = load_config(harness.TINY, [*KTO, "kto.beta=0.25", "kto.desirable_weight=1.5", "output_dir=x"])
    assert "kto" in OBJECTIVES
    settings = fingerprint_settings(cfg)
    assert settings["train.objective"] == "kto" and settings["kto"]["beta"] == 0.25
    assert settings["kto"]["desirable_weight"] == 1.5


@pytest.mark.parametrize("overrides, needle", [
    (["train.objective=kto"], "train.objective kto needs data.format preference or unpaired_preference"),
    (["data.format=unpaired_preference", f"data.path={UNPAIRED}"], "needs train.objective kto"),
    ([*KTO, "train.micro_batch_size=1"], "kto.loss_type apo_zero_unpaired"),
    ([*KTO, "model.lora.r=4", "kto.reference=model"], "kto.reference model is for full fine-tuning"),
    ([*KTO, "data.packing=shared"], "data.packing shared would let the sequences of a pack attend"),
])
def test_kto_settings_that_cannot_work_are_one_line(overrides, needle):
    with pytest.raises(UserError, match=needle) as e:
        load_config(harness.TINY, [*overrides, "output_dir=x"])
    assert "\n" not in e.value.message


def test_apo_zero_unpaired_needs_no_second_row_a_micro_batch():
    load_config(harness.TINY, [*KTO, "train.micro_batch_size=1", "kto.loss_type=apo_zero_unpaired", "output_dir=x"])


# --------------------------------------------------------------------------------------------- data

def test_rows_keep_their_labels_and_completion_targets(tmp_path):
    rows = _rows()
    _, data = _data(tmp_path, rows)
    tok = load_tokenizer(TOKENIZER)
    assert data.num_rows == len(rows) and list(data.row_labels) == [r["label"] for r in rows]
    ids, mask = data.row(1)
    assert tok.decode(ids[mask]) == rows[1]["completion"] + tok.eos_token


@pytest.mark.parametrize("label, needle", [("yes", '"yes", not true or false'), (1, "1, not true or false"),
                                           (None, "is missing")])
def test_a_label_that_is_not_a_bool_is_one_line_naming_its_line(tmp_path, label, needle):
    rows = _rows(4)
    rows[2] = {**rows[2], "label": label}
    if label is None:
        del rows[2]["label"]
    with pytest.raises(UserError) as e:
        _data(tmp_path, rows)
    assert "rows.jsonl:3" in e.value.message and needle in e.value.message and "\n" not in e.value.message
    assert "data.label_field" in e.value.message


def test_kl_rows_pair_each_prompt_with_the_completion_trl_gives_it(tmp_path):
    """TRL's KL dataset (a batched map of per_device_train_batch_size rows rotating the completions by one)
    against our partners, on a dataset whose last block is short; and the KL rows we build from the cache
    are TRL's tokens."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    rows = _rows(11)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4,
                         use_cpu=True, max_length=None, bf16=False)
    trainer = trl.KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args,
                             processing_class=load_tokenizer(TOKENIZER), train_dataset=Dataset.from_list(rows))
    ds = trainer.train_dataset
    partners = kl_partners(np.arange(len(rows)), len(rows), 4)
    assert [ds[int(p)]["completion_ids"] for p in partners] == ds["KL_completion_ids"]
    assert list(partners) == [3, 0, 1, 2, 7, 4, 5, 6, 10, 8, 9]
    _, data = _data(tmp_path, rows)  # ours: string rows start with bos (as every format's), TRL's do not
    ours = collate_kto(data, np.arange(4, 8), 0, 4, 512)
    theirs = trainer.data_collator([ds[i] for i in range(4, 8)])
    for name in ("", "kl_"):
        mask = theirs[f"{name.upper()}attention_mask"].bool()
        labels = getattr(ours, f"{name}labels")[:, 1:]
        ids, their_ids = getattr(ours, f"{name}input_ids"), theirs[f"{name.upper()}input_ids"]
        completion = theirs[f"{name.upper()}completion_mask"].bool()
        for j in range(4):
            n = int(mask[j].sum())
            assert ids[j, 1:n + 1].tolist() == their_ids[j, :n].tolist()
            assert (labels[j, :n] != -100).tolist() == completion[j, :n].tolist()


def test_preference_pairs_train_as_trl_unpairs_them(tmp_path):
    """train.objective kto on data.format preference (TRL's KTOTrainer takes paired data too): the pairs as
    unpaired rows in TRL's order and labels (unpair_preference_dataset: chosen true, rejected false), each
    row's tokens and KL row as TRL's, units of one row."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from test_dpo import PAIRS
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    pairs = [r for r in pairs if isinstance(r["prompt"], str)][:7]
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4,
                         use_cpu=True, max_length=None, bf16=False)
    trainer = trl.KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args,
                             processing_class=load_tokenizer(TOKENIZER), train_dataset=Dataset.from_list(pairs))
    ds = trainer.train_dataset
    path = harness.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = load_config(harness.TINY, ["train.objective=kto", "data.format=preference", f"data.path={path}",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output_dir=x"])
    data = prepare_data(cfg.data, load_tokenizer(TOKENIZER))
    assert data.rows_per_unit == 1 and data.num_rows == 14 and list(data.row_labels) == ds["label"]
    assert EpochOrder(data, 1, False, 512).units(0).shape == (14, 1)
    batch = collate_kto(data, np.arange(14), 0, 4, 512)
    for j in range(14):  # ours start a string prompt with bos, TRL's do not
        n = int(batch.attention_mask[j].sum())
        assert batch.input_ids[j, 1:n].tolist() == ds[j]["prompt_ids"] + ds[j]["completion_ids"]
        n = int(batch.kl_attention_mask[j].sum())
        assert batch.kl_input_ids[j, 1:n].tolist() == ds[j]["prompt_ids"] + ds[j]["KL_completion_ids"]


def test_a_mixtures_kl_rows_pair_rows_within_their_source_as_that_source_alone(tmp_path):
    """data.sources with kto: each row's KL row takes its partner in its own source's blocks, so a mixture's
    batch holds each source's rows and KL rows exactly as a run on that source alone builds them."""
    rows = _rows(20)
    a, b = (harness.write_jsonl(tmp_path / f"{n}.jsonl", part) for n, part in (("a", rows[:11]), ("b", rows[11:])))
    cfg = load_config(harness.TINY, [*KTO, "data.path=null", f"data.sources=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output_dir=x"])
    tok = load_tokenizer(TOKENIZER)
    mixed = prepare_training_data(cfg.data, tok)
    alone = [prepare_data(c, tok) for _, _, c in cfg.data.source_configs()]
    assert mixed.num_rows == 20 and mixed.bases.tolist() == [0, 11, 20]
    batch = collate_kto(mixed, np.arange(20), 0, 4, 512)
    for s, local in ((0, np.arange(11)), (1, np.arange(9))):
        own = collate_kto(alone[s], local, 0, 4, 512)
        for j, row in enumerate(local + mixed.bases[s]):
            for kind in ("", "kl_"):
                n = int(getattr(own, f"{kind}attention_mask")[j].sum())
                assert int(getattr(batch, f"{kind}attention_mask")[row].sum()) == n
                for name in (f"{kind}input_ids", f"{kind}labels"):
                    assert getattr(batch, name)[row, :n].tolist() == getattr(own, name)[j, :n].tolist(), (s, j, name)
        assert batch.desirable[mixed.bases[s]:mixed.bases[s + 1]].tolist() == own.desirable.tolist()


# -------------------------------------------------------------------------------------- against TRL

class CpuEngine(Engine):
    device = torch.device("cpu")


def _nudge(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _from_trl(batch) -> KTOBatch:
    """TRL's collated batch as our micro-batch (its rows are 0..B-1)."""
    def part(prefix):
        input_ids = batch[f"{prefix}input_ids"]
        labels = input_ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
        return input_ids, batch[f"{prefix}attention_mask"], labels, HostFacts.of_labels(labels.numpy())
    main = part("")
    kl = part("KL_") if "KL_input_ids" in batch else main  # apo_zero_unpaired: TRL builds no KL rows
    return KTOBatch(*main[:3], np.arange(len(batch["label"])), main[3], *kl, batch["label"].float())


KTO_CASES = [("model", {}), ("model", {"loss_type": "apo_zero_unpaired"}),
             ("model", {"desirable_weight": 1.3, "undesirable_weight": 0.7, "beta": 0.3}),
             ("lora", {}), ("precomputed", {})]


@pytest.mark.parametrize("reference, settings", KTO_CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v[k]}" for k in v) or "defaults")
def test_loss_metrics_and_gradients_equal_trl_kto_trainer(tmp_path, reference, settings):
    """TRL's KTOTrainer.compute_loss on its first batch (rows 0..5 of its dataset and their KL rows) against
    our KTOLoss on the same tokens, with the reference a frozen model, the base under LoRA (adapters off) or
    stored before training (TRL's precompute_ref_log_probs: its stored values equal ours): the loss, kl,
    rewards/*, logps/*, logits/* to 1e-5 and every gradient to 1e-5."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    tok = load_tokenizer(TOKENIZER)
    rows, batch_size = _rows(12), 6
    s = {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0, **settings}
    base = tiny_model("model.config.attention_dropout=0.0")
    policy, ref_model, peft_config = copy.deepcopy(base), copy.deepcopy(base), None
    if reference == "lora":
        import peft
        peft_config, ref_model = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), None
    if reference == "precomputed":
        ref_model = None
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=batch_size,
                         use_cpu=True, dataloader_num_workers=0, bf16=False, max_length=None,
                         remove_unused_columns=False, precompute_ref_log_probs=reference == "precomputed", **s)
    trainer = trl.KTOTrainer(model=policy, ref_model=ref_model, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(rows), peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    _nudge(trainer.model)  # policy != reference: nonzero rewards and margins
    ours = tiny_model("model.config.attention_dropout=0.0")  # not patched by TRL's fused head
    if reference == "lora":
        ours = peft.get_peft_model(ours, copy.deepcopy(peft_config))
    ours.load_state_dict(trainer.model.state_dict())
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    logps_fn = ChunkedLoss(ours.get_base_model() if reference == "lora" else ours, 5).sequence_logps
    if reference == "lora":
        ref_fn = kl_ref_fn = AdaptersOff(logps_fn)
    else:
        frozen = copy.deepcopy(base)
        frozen_logps = ChunkedLoss(frozen, 5).sequence_logps

        def ref_fn(engine, *a):
            with torch.no_grad():
                return frozen_logps(frozen, *a[:3])
        kl_ref_fn = ref_fn
    loss_fn = KTOLoss(logps_fn, ref_fn, kl_ref_fn, s["loss_type"], s["beta"], s["desirable_weight"],
                      s["undesirable_weight"])
    objective = KTOObjective(None, None, loss_fn, 0, 0, 1, 512, batch_size)
    engine = CpuEngine(ours)
    ours_batch = _from_trl(batch)
    if reference == "precomputed":  # TRL's stored values are the base's, as ours (one per row, one per KL row)
        values = torch.stack([ref_fn(engine, *ours_batch[:3]), ref_fn(engine, *ours_batch[5:8])], 1)
        assert torch.allclose(values[:, 0], batch["ref_logps"], atol=1e-5)
        assert torch.allclose(values[:, 1], batch["ref_KL_logps"], atol=1e-5)
        values = values.numpy()
        loss_fn = KTOLoss(logps_fn, Precomputed(values[:, 0]), Precomputed(values[:, 1]), s["loss_type"], s["beta"],
                          s["desirable_weight"], s["undesirable_weight"])
    z = objective.kl_estimates(engine, loss_fn, [ours_batch])[0]
    good = int(ours_batch.desirable.sum())
    bad = batch_size - good
    loss_sum, sums = loss_fn(engine, *ours_batch, kl=z, weights=(1 / good, 1 / bad, 1.0, 1.0))
    (loss_sum / batch_size).backward()
    assert (loss_sum / batch_size).item() == pytest.approx(trl_loss.item(), abs=1e-5)
    tokens = (ours_batch.labels[:, 1:] != -100).sum(1).float()
    good_tokens = float((tokens * ours_batch.desirable).sum())
    bad_tokens = float((tokens * (1 - ours_batch.desirable)).sum())
    means = dict(zip(METRICS, (sums / torch.tensor([good, bad, good, bad, 1, 1, good_tokens, bad_tokens])).tolist()))
    assert set(trl_metrics) - set(METRICS) == {"entropy", "num_tokens"}
    for name in METRICS:
        assert means[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert trl_metrics["rewards/margins"] != 0
    if s["loss_type"] == "kto":
        assert (loss_fn.kl_gap(engine, ours_batch) < 0) == (trl_metrics["kl"] == 0)  # the clamp
    _compare_grads(ours, trainer.model)


# -------------------------------------------------------------------------------------------- the step

class AccumulatingEngine(CpuEngine):
    """What `objectives.accumulate` uses of a DeepSpeed engine on one rank, ZeRO 0, fp32: backward sums the
    gradients (divided by grad_accum, as DeepSpeed), step() does nothing."""
    global_rank, seq_dp_world_size, sequence_parallel_size = 0, 1, 1

    def __init__(self, module, grad_accum):
        super().__init__(module)
        self.grad_accum = grad_accum

    def fp16_enabled(self):
        return False

    def zero_optimization_stage(self):
        return 0

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self):
        return False

    def step(self):
        pass


def test_a_step_is_the_mean_over_its_rows_with_each_micro_steps_kl_and_per_label_metrics(tmp_path):
    """KTOObjective.step over a global batch of 8 rows in two micro-batches against the same losses written
    out: each micro-batch's z from its own KL rows (clamped), the loss the mean over the 8 rows, rewards/*
    and logps/* means over each label's rows of the whole batch, kl the mean of the two z, and the
    gradient that of the mean loss."""
    from ds_finetune.objectives.kto import kto_losses
    from ds_finetune.sampler import BatchLayout

    _, data = _data(tmp_path, _rows(16), "train.micro_batch_size=4")
    base = tiny_model("model.config.attention_dropout=0.0")
    policy = copy.deepcopy(base)
    _nudge(policy)
    reference = ChunkedLoss(base, 5).sequence_logps
    logps_fn = ChunkedLoss(policy, 5).sequence_logps

    def ref_fn(engine, *a):
        with torch.no_grad():
            return reference(base, *a[:3])
    loss_fn = KTOLoss(logps_fn, ref_fn, ref_fn, "kto", 0.5, 1.2, 0.8)
    objective = KTOObjective(data, BatchLayout(4, 2, 1), loss_fn, 0, 0, 1, 512, 4)
    units = np.array([3, 9, 0, 14, 5, 6, 12, 1]).reshape(-1, 1)
    engine = AccumulatingEngine(policy, 2)
    result = objective.step(engine, units, 1)
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    losses, zs, rewards, logps = [], [], [], []
    for rows in (units[:4, 0], units[4:, 0]):
        b = objective.collate(data, rows)
        with torch.no_grad():
            gap = (logps_fn(policy, *b[5:8]) - ref_fn(None, *b[5:8])).mean()
        zs.append(gap.clamp(min=0))
        ratio = logps_fn(policy, *b[:3]) - ref_fn(None, *b[:3])
        losses.append(kto_losses(ratio, b.desirable, zs[-1], "kto", 0.5, 1.2, 0.8))
        rewards.append(0.5 * ratio.detach())
        logps.append(logps_fn(policy, *b[:3]).detach())
    torch.cat(losses).mean().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    good = torch.from_numpy(np.asarray(data.row_labels[units[:, 0]]))
    rewards, logps = torch.cat(rewards), torch.cat(logps)
    expected = {"rewards/chosen": rewards[good].mean(), "rewards/rejected": rewards[~good].mean(),
                "logps/chosen": logps[good].mean(), "logps/rejected": logps[~good].mean(),
                "rewards/margins": rewards[good].mean() - rewards[~good].mean(), "kl": sum(zs) / 2}
    assert {"logits/chosen", "logits/rejected"} <= set(result.sums)
    assert 0 < int(good.sum()) < 8
    metrics = {k: float(total) / count for k, (total, count) in result.sums.items() if count}
    assert result.normaliser == 8
    assert float(result.loss_sum) / 8 == pytest.approx(torch.cat(losses).mean().item(), abs=1e-6)
    assert max(zs) > 0 and zs[0] != zs[1]  # two micro-steps, two estimates
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(float(value), abs=1e-5), name


@pytest.mark.parametrize("chunk", [5, 0])
def test_packed_rows_and_kl_rows_give_the_padded_steps_loss_metrics_and_gradients(tmp_path, chunk):
    """data.packing isolated with KTO: a micro-batch's rows packed into rows of at most data.max_length
    tokens, and apart from them its KL rows, each sequence attending only to itself: KTOObjective.step over
    two micro-batches gives the padded step's loss, every metric (the KL estimates, logits/* per token) and
    every gradient within 1e-5, the reference a frozen base taking the same packed batches."""
    from ds_finetune.loss import make_sequence_logps_fn
    from ds_finetune.sampler import BatchLayout

    _, data = _data(tmp_path, _rows(16), "train.micro_batch_size=4", "data.max_length=96")
    base = tiny_model("model.config.attention_dropout=0.0")
    units = np.array([3, 9, 0, 14, 5, 6, 12, 1]).reshape(-1, 1)
    packed = collate_kto(data, units[:4, 0], 2, 4, 96, pack_length=96)
    assert packed.attention_mask is None and packed.kl_attention_mask is None
    assert packed.input_ids.size(0) < 4 and packed.kl_input_ids.size(0) < 4  # 4 sequences in fewer rows
    assert packed.facts.sequence_targets() == [int(data.row_targets[r]) for r in units[:4, 0]]
    results = []
    for pack in (None, 96):
        policy = copy.deepcopy(base)
        _nudge(policy)
        logps_fn, reference = make_sequence_logps_fn(policy, chunk), make_sequence_logps_fn(base, chunk)

        def ref_fn(engine, input_ids, attention_mask, labels, rows, facts):
            with torch.no_grad():
                return reference(base, input_ids, attention_mask, labels, facts)
        loss_fn = KTOLoss(logps_fn, ref_fn, ref_fn, "kto", 0.5, 1.2, 0.8)
        objective = KTOObjective(data, BatchLayout(4, 2, 1), loss_fn, 0, 0, 1, 96, 4, pack_length=pack)
        result = objective.step(AccumulatingEngine(policy, 2), units, 1)
        sums = torch.stack([result.sums[name][0] for name in METRICS])
        results.append((result.loss_sum.detach(), sums, [p.grad.clone() for p in policy.parameters()]))
    (loss, sums, grads), (p_loss, p_sums, p_grads) = results
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_sums, sums, rtol=1e-5, atol=1e-5)
    assert sums[METRICS.index("kl")] > 0 and len(grads) == len(p_grads) > 0
    for a, b in zip(p_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
