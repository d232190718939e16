"""DPO: the preference format, the loss against TRL's DPOTrainer (the anchor), the fused per-sequence
log-probs, and, in real runs, exact resume after SIGKILL and the precomputed reference's pass."""
from __future__ import annotations

import copy
import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
from ds_finetune.config import DpoConfig, load_config
from ds_finetune.data import (IGNORE_INDEX, EpochOrder, collate_pairs, epoch_order, load_tokenizer, prepare_data,
                              prepare_training_data)
from ds_finetune.evaluate import build_evaluator
from ds_finetune.state import TrainState
from ds_finetune.objectives.dpo import METRICS, TOKEN_METRICS, AdaptersOff, DPOLoss, Precomputed, dpo_loss
from ds_finetune.errors import UserError
from ds_finetune.fused_head import fused_sequence_logps
from ds_finetune.loss import ChunkedLoss, full_sequence_logps
from harness import tiny_model
from host_syncs import recording_host_syncs

PAIRS = harness.ROOT / "data" / "tiny" / "preference.jsonl"
DPO = ["train.objective=dpo", "data.format=preference", f"data.path={PAIRS}"]


def config(tmp_path, *overrides):
    return load_config(harness.TINY, [*DPO, f"data.cache_dir={tmp_path / 'cache'}", *overrides,
                                      f"output_dir={tmp_path / 'out'}"])


# ------------------------------------------------------------------------------------------- format

def test_pairs_are_consecutive_rows_with_the_completion_as_targets(tmp_path):
    cfg = config(tmp_path)
    tok = load_tokenizer(cfg.model.tokenizer)
    data = prepare_data(cfg.data, tok)
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert data.num_rows == 2 * len(rows) and list(data.row_ids[:4]) == [0, 0, 1, 1]
    for p, row in enumerate(rows[:6]):
        (c_ids, c_mask), (r_ids, _) = data.row(2 * p), data.row(2 * p + 1)
        prompt = int(np.argmax(c_mask))
        assert list(c_ids[:prompt]) == list(r_ids[:prompt]) and not c_mask[:prompt].any() and c_mask[prompt:].all()
        completion = tok.decode(c_ids[prompt:])
        chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][0]["content"]
        assert chosen.strip() in completion
        if isinstance(row["chosen"], str):  # strings end with eos, as prompt_completion's do
            assert c_ids[-1] == tok.eos_token_id and r_ids[-1] == tok.eos_token_id
    units = EpochOrder(data, 1, False, 128).units(0)
    assert units.shape == (len(rows), 2) and (units[:, 1] == units[:, 0] + 1).all() and (units[:, 0] % 2 == 0).all()


def test_a_pair_mixture_batches_each_pair_as_its_source_alone_and_evaluates_per_source(tmp_path):
    """data.sources and eval.sources with dpo: the mixture's units are pairs of one source, collated as
    that source alone collates them, and eval.sources holds each source's pairs once, grouped."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    a, b = (harness.write_jsonl(tmp_path / f"{n}.jsonl", part) for n, part in (("a", rows[:120]), ("b", rows[120:])))
    cfg = config(tmp_path, "data.path=null", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]",
                 f"eval.sources=[{{path: {a}}}, {{path: {b}}}]")
    tok = load_tokenizer(cfg.model.tokenizer)
    mixed = prepare_training_data(cfg.data, tok)
    alone = [prepare_data(c, tok) for _, _, c in cfg.data.source_configs()]
    units = epoch_order(cfg, mixed).batch(TrainState(), 20).units
    batch = collate_pairs(mixed, units, tok.pad_token_id)
    for j, unit in enumerate(units):
        s = int(mixed.source_of(unit[0]))
        own = collate_pairs(alone[s], (unit - mixed.bases[s])[None], tok.pad_token_id)
        for k in (0, 1):  # chosen, rejected
            n = int(own.attention_mask[k].sum())
            assert batch.input_ids[j + 20 * k, :n].tolist() == own.input_ids[k, :n].tolist()
            assert batch.labels[j + 20 * k, :n].tolist() == own.labels[k, :n].tolist()
    assert sorted(np.bincount(mixed.source_of(units[:, 0])).tolist()) == [6, 14]
    evaluator, _ = build_evaluator(cfg, tok, mixed, 0, 1)
    assert [evaluator.units(r)[:, 0].tolist() for r in evaluator.groups] == [
        list(range(0, 240, 2)), list(range(240, 400, 2))]


def test_truncation_keeps_the_prompts_end_and_counts_the_cut_pairs(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 60 + "END", "chosen": " yes " * 30, "rejected": " no"}) + "\n"
                    + json.dumps({"prompt": "short", "chosen": " a", "rejected": " b"}) + "\n")
    cfg = config(tmp_path, f"data.path={path}", "data.max_length=40", "data.max_prompt_length=20")
    tok = load_tokenizer(cfg.model.tokenizer)
    data = prepare_data(cfg.data, tok)
    assert data.truncated_pairs == 1 and data.num_rows == 4
    ids, mask = data.row(0)
    assert len(ids) == 40 and int((~mask).sum()) == 20 and "END" in tok.decode(ids[:20])


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "p", "chosen": " a"}, "'rejected' is missing"),
    ({"prompt": "p", "chosen": " a", "rejected": " "}, "rejected is empty"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical"),
    ({"prompt": "x " * 200, "chosen": " a", "rejected": " b"}, "max_prompt_length"),
])
def test_a_bad_pair_is_one_line_naming_its_row(tmp_path, row, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": " a", "rejected": " b"}) + "\n" + json.dumps(row) + "\n")
    cfg = config(tmp_path, f"data.path={path}")
    with pytest.raises(UserError) as e:
        prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    assert "bad.jsonl:2" in e.value.message and needle in e.value.message and "\n" not in e.value.message


def test_dpo_needs_the_preference_format(tmp_path):
    with pytest.raises(UserError, match="train.objective dpo needs data.format preference"):
        load_config(harness.TINY, ["train.objective=dpo", "output_dir=x"])
    with pytest.raises(UserError, match="data.format preference needs a pair objective"):
        load_config(harness.TINY, ["data.format=preference", "output_dir=x"])


# -------------------------------------------------------------------------------------------- loss

def test_per_sequence_log_probs_and_gradients_equal_autograd_on_full_logits():
    g = torch.Generator().manual_seed(0)
    h64, w64, b64 = (torch.randn(37, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g,
                     dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64))
    t, counts = torch.randint(0, 50, (37,), generator=g), [10, 0, 20, 7]
    weights = torch.randn(4, generator=g, dtype=torch.float64)
    want = [x.clone().requires_grad_() for x in (h64, w64, b64)]
    full = torch.log_softmax(F.linear(*want), -1).gather(1, t[:, None])[:, 0]
    expected = torch.stack([part.sum() for part in torch.split(full, counts)])
    (expected * weights).sum().backward()
    for chunk in (1, 8, 64):
        got = [x.float().requires_grad_() for x in (h64, w64, b64)]
        logps = fused_sequence_logps(*got, t, counts, chunk)
        (logps * weights.float()).sum().backward()
        assert torch.allclose(logps.double(), expected.detach(), rtol=1e-6, atol=1e-5)
        for a, b in zip(got, want):
            assert torch.allclose(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5)


def test_label_smoothing_is_conservative_dpo():
    policy, reference = torch.tensor([-3.0, -5.0, -4.0, -2.0]), torch.tensor([-3.5, -4.0, -4.5, -2.5])
    losses, _ = dpo_loss(policy, reference, torch.tensor([3, 4, 5, 6]), 0.2, "sigmoid", 0.1)
    d = (policy[:2] - reference[:2]) - (policy[2:] - reference[2:])
    assert torch.allclose(losses, -0.9 * F.logsigmoid(0.2 * d) - 0.1 * F.logsigmoid(-0.2 * d))


class Engine:
    """What the loss functions use of a DeepSpeed engine: a call and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def _trl_pairs(n=8):
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    return [r for r in rows if isinstance(r["prompt"], str)][:n]


# (our dpo section, TRL's DPOConfig arguments): every pair-defined loss type of TRL 1.16, a weighted list and
# rpo_alpha (TRL's list with sft); label_smoothing where the loss type reads it.
LOSS_CASES = [({"loss_type": t}, {"loss_type": [t]}) for t in
              ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
               "sigmoid_norm", "sft")] + [
    ({"loss_type": t, "label_smoothing": 0.2}, {"loss_type": [t], "label_smoothing": 0.2})
    for t in ("exo_pair", "robust", "aot")] + [
    ({"loss_type": "discopop", "discopop_tau": 0.3}, {"loss_type": ["discopop"], "discopop_tau": 0.3}),
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
     {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    ({"loss_type": "ipo", "rpo_alpha": 0.5}, {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]}),
]


@pytest.mark.parametrize("our_dpo, theirs, lora", [(*case, False) for case in LOSS_CASES] + [
    ({"loss_type": "sigmoid"}, {"loss_type": ["sigmoid"]}, True),
    ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}, True),
    ({"loss_type": "apo_down", "rpo_alpha": 0.3}, {"loss_type": ["apo_down", "sft"], "loss_weights": [1, 0.3]}, True),
], ids=lambda v: v if isinstance(v, bool) else "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_loss_metrics_and_gradients_equal_trl_dpo_trainer(tmp_path, our_dpo, theirs, lora):
    """TRL's DPOTrainer.compute_loss on its own collated batch against our DPOLoss on the same tokens, for
    each loss type: the loss and TRL's six metrics to 1e-5, and every parameter's gradient to 1e-5. With
    LoRA both take the reference from the same model with its adapters disabled."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = load_tokenizer(str(harness.ROOT / "assets" / "tiny-tokenizer"))
    base = tiny_model("model.config.attention_dropout=0.0")
    g = torch.Generator().manual_seed(3)
    policy, reference = (base, None) if lora else (copy.deepcopy(base), base)
    peft_config, ours_reference = None, copy.deepcopy(base)
    if lora:  # TRL wraps the model itself: a new adapter, the reference is the base with adapters disabled
        import peft
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, **theirs, report_to=[],
                         per_device_train_batch_size=len(_trl_pairs()), use_cpu=True, max_length=None,
                         dataloader_num_workers=0, bf16=False)  # fp32 as ours (TRL defaults to bf16 autocast)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(_trl_pairs()), peft_config=peft_config)
    policy = trainer.model
    with torch.no_grad():  # policy != reference, so rewards and margins are not all zero
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    # Ours: the same weights in a model TRL has not patched (its fused head wraps the model's forward).
    ours = tiny_model("model.config.attention_dropout=0.0")
    if lora:
        ours = peft.get_peft_model(ours, copy.deepcopy(peft_config))
    ours.load_state_dict(policy.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    logps_fn = ChunkedLoss(ours.get_base_model() if lora else ours, 5).sequence_logps
    if lora:
        ref_fn = AdaptersOff(logps_fn)
    else:
        ref_logps = ChunkedLoss(ours_reference, 5).sequence_logps

        def ref_fn(engine, *a):
            with torch.no_grad():
                return ref_logps(ours_reference, *a[:3])
    engine = Engine(ours)
    d = DpoConfig(beta=0.1, **our_dpo)
    pairs = input_ids.size(0) // 2
    loss_fn = DPOLoss(logps_fn, ref_fn, d.beta, d.weighted_losses, d.label_smoothing, d.discopop_tau)
    loss_sum, sums = loss_fn(engine, input_ids, attention_mask, labels, np.arange(2 * pairs))
    (loss_sum / pairs).backward()
    assert (loss_sum / pairs).item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name, value in zip(METRICS, (sums / pairs).tolist()):
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name
    chosen_tokens, rejected_tokens = (int((labels[rows, 1:] != IGNORE_INDEX).sum()) for rows in
                                      (slice(0, pairs), slice(pairs, None)))
    token_means = sums[len(METRICS):] / torch.tensor([chosen_tokens, rejected_tokens, chosen_tokens])
    for name, value in zip(TOKEN_METRICS, token_means.tolist()):  # from the fused head's per-token stats
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert set(trl_metrics) - set(METRICS) - set(TOKEN_METRICS) == {"entropy", "num_tokens"}
    assert trl_metrics["rewards/margins"] != 0
    trl_grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trl_grads.keys() == our_grads.keys() and trl_grads
    for n in trl_grads:
        torch.testing.assert_close(our_grads[n], trl_grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_full_logits_path_gives_the_chunked_log_probs():
    model = tiny_model("model.config.attention_dropout=0.0")
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 512, (4, 30), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, 20:] = 0
    labels = input_ids.masked_fill(torch.arange(30) < 10, IGNORE_INDEX)
    labels[3, 20:] = IGNORE_INDEX
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    chunked_stats, full_stats = torch.zeros(targets, 2), torch.zeros(targets, 2)
    chunked = ChunkedLoss(model, 7).sequence_logps(model, input_ids, attention_mask, labels, stats=chunked_stats)
    full = full_sequence_logps(model, input_ids, attention_mask, labels, stats=full_stats)
    assert torch.allclose(chunked, full, atol=1e-4, rtol=1e-6)
    assert torch.allclose(chunked_stats, full_stats, atol=1e-5) and chunked_stats[:, 0].abs().sum() > 0


@pytest.mark.parametrize("reference", ["precomputed", "adapters off"])
def test_a_dpo_step_reads_nothing_back_from_the_device(tmp_path, reference):
    """Forward and backward of DPOLoss on collated pairs, the reference read by row on the host or taken
    from the model with its adapters off: no value of a tensor is read back (tests/host_syncs.py)."""
    cfg = config(tmp_path)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    batch = collate_pairs(data, EpochOrder(data, 1, False, 128).units(0)[:3], 2)
    model = tiny_model("model.config.attention_dropout=0.0")
    if reference == "precomputed":
        ref_fn, logps_fn = Precomputed(np.linspace(-9, -1, data.num_rows)), ChunkedLoss(model, 5).sequence_logps
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        logps_fn = ChunkedLoss(model.get_base_model(), 5).sequence_logps
        ref_fn = AdaptersOff(logps_fn)
    with recording_host_syncs() as syncs:
        loss_sum, sums = DPOLoss(logps_fn, ref_fn, 0.1, (("sigmoid", 1.0),), 0.0)(Engine(model), *batch, grad_scale=0.5)
        (loss_sum * 0.5).backward()
    assert syncs.by("ds_finetune/") + syncs.by("elsewhere") == []
    assert loss_sum.item() > 0 and any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("objective, chunk", [("dpo", 5), ("dpo", 0), ("simpo", 5), ("orpo", 5), ("orpo", 0)])
def test_packed_pairs_give_the_unpacked_loss_metrics_and_gradients(tmp_path, objective, chunk):
    """data.packing isolated with a pair objective: a micro-batch's sequences packed into rows of at most
    data.max_length tokens, each attending only to itself, give the padded batch's loss, metrics and every
    gradient within 1e-5 (DPO with LoRA, its reference the packed base with adapters off; SimPO's per-token
    means; ORPO's NLL over the chosen prompts too), through the fused head and the full logits."""
    import peft

    from ds_finetune.loss import make_sequence_logps_fn, make_token_logps_fn
    from ds_finetune.objectives.cpo import CPOLoss
    from ds_finetune.objectives.orpo import ORPOLoss
    cfg = config(tmp_path, "data.max_length=64")
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    units = EpochOrder(data, 1, False, 64).units(0)[:6]
    packed = collate_pairs(data, units, 2, pack_length=64)
    assert packed.attention_mask is None and packed.input_ids.size(0) < 12  # 12 sequences in fewer rows
    assert packed.input_ids.size(1) <= 64 and packed.facts.sequence_targets() == [
        int(data.row_targets[r]) for r in np.concatenate([units[:, 0], units[:, 1]])]
    results = []
    for pack in (None, 64):
        model = peft.get_peft_model(tiny_model("model.config.attention_dropout=0.0"),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        logps_fn = make_sequence_logps_fn(model.get_base_model(), chunk)
        loss_fn = {"dpo": lambda: DPOLoss(logps_fn, AdaptersOff(logps_fn), 0.1, (("sigmoid", 1.0), ("sft", 0.5)),
                                          0.0, pack_length=pack),
                   "simpo": lambda: CPOLoss(logps_fn, "simpo", 2.0, 0.5, 0.0, 1.0, pack_length=pack),
                   "orpo": lambda: ORPOLoss(make_token_logps_fn(model.get_base_model(), chunk), 0.1, pack)}[objective]()
        loss_sum, sums = loss_fn(Engine(model), *loss_fn.collate(data, units, 2))
        loss_sum.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss_sum.detach(), sums, grads))
    (loss, sums, grads), (p_loss, p_sums, p_grads) = results
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_sums, sums, rtol=1e-5, atol=1e-5)
    assert sums[3] != 0 and len(grads) == len(p_grads) > 0  # the margins: the adapters moved the policy
    for a, b in zip(p_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ real runs

LORA = [*DPO, "model.lora.r=8", "eval.fraction=0.05", "eval.every_steps=3"]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 with LoRA: test_lora's SFT and GRPO's random kill
def test_dpo_lora_killed_mid_accumulation_resumes_bitwise(tmp_path, stage):
    """Two ranks, ZeRO-2 (with the pairs packed: data.packing isolated) and ZeRO-3, LoRA (reference: adapters
    disabled), dropout on, held-out pairs evaluated every 3 steps: SIGKILL on rank 1 inside step 5's
    accumulation, --resume from step 4; losses, DPO metrics (train and eval), samples and final adapters as
    the uninterrupted run's."""
    packed = ["data.packing=isolated"] if stage == 2 else []
    ref, got, run = tmp_path / "ref", tmp_path / "got", [*LORA, f"train.zero_stage={stage}", *packed]
    harness.train(ref, run)
    harness.kill_in_step5(got, run)
    harness.assert_resumed(harness.train(got, run, resume="auto"), step=4)
    harness.assert_same_run(got, ref)
    harness.assert_same_metrics(got, ref, [*METRICS, "eval_loss", *(f"eval_{m}" for m in METRICS)])
    rows = harness.metrics(got)
    assert [r["step"] for r in rows if "eval_rewards/accuracies" in r] == [3, 6, 9, 10]
    # The adapters start as the reference (only the policy's dropout, 0.1 in harness.BASE, moves it off log 2).
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=5e-3)
    assert rows[-1]["rewards/margins"] != 0
    harness.assert_same_final_weights(got, ref)


@pytest.mark.multiproc
def test_precomputed_reference_pass_killed_midway_continues_to_a_fresh_pass_values(tmp_path):
    """Full fine-tuning: the reference pass is killed after its 3rd round; the next start keeps the rounds on
    disk, computes the rest and trains; its stored log-probs equal, bitwise, a fresh pass on two ranks."""
    run = [*DPO, "train.max_steps=2", "train.zero_stage=2", "model.config.attention_dropout=0.0"]
    killed = harness.train(tmp_path / "a", [*run, f"data.cache_dir={tmp_path / 'c1'}"], nproc=1,
                           fault="mid_reference@step3", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    partial = list((tmp_path / "c1" / "reference").glob("*.partial"))
    assert len(partial) == 1 and len(list(partial[0].glob("block-*.npy"))) == 3
    resumed = harness.train(tmp_path / "a", [*run, f"data.cache_dir={tmp_path / 'c1'}"], nproc=1, resume="auto")
    assert "3 of 100 rounds done before" in resumed.stdout
    assert harness.metrics(tmp_path / "a")[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    harness.train(tmp_path / "b", [*run, f"data.cache_dir={tmp_path / 'c2'}"], nproc=2)
    (a,), (b,) = ((p / "reference").glob("*/logps.npy") for p in (tmp_path / "c1", tmp_path / "c2"))
    assert a.parent.name == b.parent.name  # the same key: data and base, not the world size
    assert np.array_equal(np.load(a), np.load(b))
    assert not list((tmp_path / "c1" / "reference").glob("*.partial"))


# Full fine-tuning at ZeRO 3 on a two-source mixture (70/30, counted in pairs; evaluated per source at
# steps 5 and 10), the reference precomputed per source: one uninterrupted run and one killed inside step 5's
# accumulation (newest checkpoint: step 4), made once for the module and resumed by the tests below.
def mixture_run(folder, stage: int = 3) -> list[str]:
    rows = PAIRS.read_text().splitlines(keepends=True)
    for name, part in (("a", rows[:120]), ("b", rows[120:])):
        (folder / f"{name}.jsonl").write_text("".join(part))
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    return [*DPO, "data.path=null", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]",
            f"eval.sources=[{{path: {a}}}, {{path: {b}}}]", "eval.every_steps=5", "eval.max_batches=1",
            f"train.zero_stage={stage}"]


@pytest.fixture(scope="module")
def full_dpo_zero3(tmp_path_factory):
    ref, killed = tmp_path_factory.mktemp("dpo3-ref"), tmp_path_factory.mktemp("dpo3-killed")
    run = mixture_run(tmp_path_factory.mktemp("dpo3-data"))
    harness.train(ref, run)
    harness.kill_in_step5(killed, run)
    return ref, killed, run


@pytest.mark.multiproc
def test_dpo_full_zero3_killed_mid_accumulation_resumes_bitwise(full_dpo_zero3, tmp_path):
    """Two ranks, ZeRO-3, full fine-tuning on a two-source mixture (reference precomputed per source), dropout
    on: the run SIGKILLed on rank 1 inside step 5 resumes from step 4 with the uninterrupted run's losses, DPO
    metrics (train, and eval per source), samples and final weights, bitwise."""
    ref, killed, run = full_dpo_zero3
    got = harness.copy_run(killed, tmp_path / "got")
    resumed = harness.train(got, run, resume="auto")
    harness.assert_resumed(resumed, step=4)
    assert "converting" not in resumed.stdout
    harness.assert_same_run(got, ref)
    harness.assert_same_metrics(got, ref, [*METRICS, "eval_loss/a", "eval_loss/b", "eval_rewards/accuracies"])
    rows = harness.metrics(got)
    assert [r["step"] for r in rows if "eval_loss/b" in r] == [5, 10]
    assert rows[-1]["rewards/margins"] != 0 and rows[-1]["loss"] != rows[0]["loss"]  # it trained
    harness.assert_same_final_weights(got, ref)


@pytest.mark.multiproc
def test_dpo_full_zero3_checkpoint_resumes_under_zero2(full_dpo_zero3, tmp_path):
    """The killed ZeRO-3 run resumed under ZeRO 2 (its checkpoint converted, the stored reference reused):
    the same steps and samples as the uninterrupted ZeRO-3 run, losses and DPO metrics within 1e-5 (the
    rewards: 1e-5 of the log-probs they are differences of)."""
    ref, killed, run = full_dpo_zero3
    got = harness.copy_run(killed, tmp_path / "got")
    proc = harness.train(got, [*run, "train.zero_stage=2"], resume="auto")
    harness.assert_resumed(proc, step=4)
    assert "converting" in proc.stdout and "for ZeRO 2 on 2 ranks" in proc.stdout, proc.stdout[-2000:]
    assert "computing the reference log-probs" not in proc.stdout
    harness.assert_close_run(got, ref)
    rows, ref_rows = harness.metrics(got), harness.metrics(ref)
    assert len(rows) == len(ref_rows) == 10
    for r, a in zip(rows, ref_rows):
        # rewards are beta x differences of summed log-probs: their float noise is that of the log-probs
        noise = 1e-5 * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))
        for name in METRICS:
            assert r[name] == pytest.approx(a[name], rel=1e-5, abs=noise), (a["step"], name, r[name], a[name])


@pytest.mark.multiproc
def test_a_frozen_model_reference_trains_as_the_precomputed_one_and_resumes_bitwise(full_dpo_zero3, tmp_path):
    """dpo.reference: model (a frozen copy of the base as its own ZeRO-3 engine) gives the precomputed
    reference's steps to float noise (same samples, losses and metrics within 1e-5: the same base, batched
    otherwise), and, killed inside step 5 and resumed, the uninterrupted run's steps bitwise (the copy is
    rebuilt from the base, and building it draws no random number the policy's dropout would have)."""
    precomputed, _, run = full_dpo_zero3
    run = [*run, "dpo.reference=model"]
    ref, got = tmp_path / "ref", tmp_path / "got"
    proc = harness.train(ref, run)
    assert "computing the reference log-probs" not in proc.stdout
    harness.assert_close_run(ref, precomputed)
    for r, a in zip(harness.metrics(ref), harness.metrics(precomputed)):
        noise = 1e-5 * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))
        for name in METRICS:
            assert r[name] == pytest.approx(a[name], rel=1e-5, abs=noise), (a["step"], name, r[name], a[name])
    harness.kill_in_step5(got, run)
    harness.assert_resumed(harness.train(got, run, resume="auto"), step=4)
    harness.assert_same_run(got, ref)
    harness.assert_same_final_weights(got, ref)


def test_a_frozen_model_reference_is_for_full_fine_tuning():
    with pytest.raises(UserError, match="dpo.reference model is for full fine-tuning"):
        load_config(harness.TINY, [*DPO, "dpo.reference=model", "model.lora.r=8", "output_dir=x"])


def test_loss_weights_must_match_the_loss_types_one_line():
    with pytest.raises(UserError) as e:
        load_config(harness.TINY, [*DPO, "dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]", "output_dir=x"])
    assert "dpo.loss_weights has 1 entries for 2 dpo.loss_type entries" in e.value.message
    assert "\n" not in e.value.message
    with pytest.raises(UserError, match="exo_pair needs dpo.label_smoothing > 0"):
        load_config(harness.TINY, [*DPO, "dpo.loss_type=exo_pair", "output_dir=x"])


def test_rpo_alpha_adds_the_chosen_nll_and_old_dpo_fingerprints_stay():
    from ds_finetune.objectives import fingerprint_settings
    cfg = load_config(harness.TINY, [*DPO, "dpo.loss_type=[ipo,hinge]", "dpo.loss_weights=[0.5,2]", "dpo.rpo_alpha=0.1",
                                     "output_dir=x"])
    assert cfg.dpo.weighted_losses == (("ipo", 0.5), ("hinge", 2.0), ("sft", 0.1))
    plain = fingerprint_settings(load_config(harness.TINY, [*DPO, "output_dir=x"]))
    assert plain == {"train.objective": "dpo", "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                                      "reference": "precomputed"}}
    assert fingerprint_settings(cfg)["dpo"]["rpo_alpha"] == 0.1
