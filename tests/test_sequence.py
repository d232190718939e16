"""Sequence parallelism (train.sequence_parallel, DeepSpeed Ulysses).

In process: a sequence split along its length loses no target at a shard border and carries global
positions; the labels-shifted loss equals the usual one; the DP x SP layout and every bad layout (one line).
Launched (gloo, CPU): one step at SP=2 and at DP=2 x SP=2 gives SP=1's loss, gradient norm and weights at every ZeRO
stage, tied and untied, fused and full loss, and with train.tiled_mlp at ZeRO-3; a run SIGKILLed at SP=2
resumes bitwise; SP=2 -> SP=1 -> SP=2 resumes and SP=2 on 2 ranks -> 4 ranks (converted) continue the same
samples with the same losses (and eval losses) to float noise. DPO (its reference pass too) and ORPO at SP=2
give SP=1's losses and metrics; DPO killed at SP=2 resumes bitwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.data import IGNORE_INDEX, HostFacts
from ds_finetune.data.packing import Batch
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.sequence import SequenceGroup, check_model, joined_order, shard
from test_config import TINY, cli_error, invoke

PAD = 2


def batch_of(lengths, width=None, isolate=False, seed=0) -> Batch:
    """Right-padded rows of random tokens; some positions are no target (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 500, (n,), generator=g)
        labels[i, 1:n] = ids[i, 1:n]
        labels[i, 1:n // 3] = IGNORE_INDEX  # a prompt
    positions = torch.arange(width).repeat(len(lengths), 1) if isolate else None
    return Batch(ids, None if isolate else (ids != PAD).long(), labels, positions)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_a_split_sequence_keeps_every_target_once_with_global_positions(size):
    batch = batch_of([13, 7, 1, 16])
    parts = [shard(batch, r, size, PAD) for r in range(size)]
    width = parts[0].input_ids.shape[1] * size
    assert width % size == 0 and 16 <= width < 16 + size
    assert all(p.attention_mask is None and p.input_ids.shape == parts[0].input_ids.shape for p in parts)
    ids, labels, positions = (torch.cat([getattr(p, k) for p in parts], dim=1)
                              for k in ("input_ids", "labels", "position_ids"))
    assert torch.equal(ids[:, :16], batch.input_ids) and bool((ids[:, 16:] == PAD).all())
    assert torch.equal(positions, torch.arange(width).expand(4, width))  # global, not restarting per shard
    # labels[:, t] is the target of position t: the next token wherever the original row has a target there
    assert torch.equal(labels[:, :15], batch.labels[:, 1:]) and bool((labels[:, 15:] == IGNORE_INDEX).all())
    n = width // size
    for r in range(size - 1):  # the border: a shard's last position predicts the next shard's first token
        border = parts[r].labels[:, -1]
        assert torch.equal(border, torch.cat([batch.labels, torch.full((4, width), IGNORE_INDEX)], 1)[:, (r + 1) * n])
    total = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert sum(int((p.labels != IGNORE_INDEX).sum()) for p in parts) == total  # none lost, none twice


def test_a_split_keeps_the_batchs_own_positions_and_continues_them_into_the_padding():
    batch = batch_of([5, 5], width=5, isolate=True)
    batch = batch._replace(position_ids=torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
    parts = [shard(batch, r, 2, PAD) for r in range(2)]
    assert torch.cat([p.position_ids for p in parts], 1).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert parts[0].facts.segments == parts[1].facts.segments == ((3, 3), (2, 4))  # read back: none given


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("isolate", [False, True])
def test_a_slices_host_facts_are_its_targets_and_the_gathered_rows_boundaries(size, isolate):
    """Each slice's target positions are where its shifted labels have a target; its flash boundaries are
    those transformers reads from the positions Ulysses gathers (every slice's, side by side)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    batch = batch_of([13, 7, 16])
    segments = ((5, 8, 3), (7, 9), (16,)) if isolate else None
    if isolate:
        positions = [list(range(n)) for row in segments for n in row]
        batch = batch._replace(attention_mask=None, position_ids=torch.tensor(
            [sum(positions[:3], []), sum(positions[3:5], []), positions[5]]))
    batch = batch._replace(facts=HostFacts.of_labels(batch.labels.numpy(), segments))
    parts = [shard(batch, r, size, PAD) for r in range(size)]
    gathered = torch.cat([p.position_ids for p in parts], 1)
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(gathered)
    for p in parts:
        assert np.array_equal(p.facts.targets, (p.labels != IGNORE_INDEX).numpy())
        assert p.facts.cu_seq_lens().tolist() == cu.tolist() and p.facts.longest_segment() == int(longest)


@pytest.fixture(scope="module")
def tiny_model():
    return harness.tiny_model().eval()


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_slices_targets_joined_in_rank_order_map_back_to_the_batchs_target_order(size):
    """A pair loss under sequence parallelism takes every rank's slice values joined in rank order
    (`JoinedLogps`); `joined_order` must put them back in the batch's row-major target order."""
    batch = batch_of([13, 7, 2, 16])
    facts = HostFacts.of_labels(batch.labels.numpy())
    value = {(r, t): 1000 * r + t for r, t in zip(*np.nonzero(facts.targets))}  # a value per target position
    sizes, joined, order = joined_order(facts, size)
    slices = []
    for k in range(size):
        part = shard(batch, k, size, PAD)
        n = part.input_ids.shape[1]
        rows, columns = np.nonzero(part.facts.targets)
        slices.append([value[r, k * n + c] for r, c in zip(rows, columns)])
        start = sum(sizes[:k])
        assert [list(value.values())[i] for i in joined[start:start + sizes[k]]] == slices[k]  # a rank's own
    assert sizes == [len(part) for part in slices]
    assert np.array(sum(slices, []))[order].tolist() == list(value.values())  # row-major, as np.nonzero


@pytest.mark.parametrize("chunk", [0, 5])
def test_the_loss_of_shifted_labels_is_the_loss_of_the_batch(tiny_model, chunk):
    """At SP=1 the shard is the whole (padded) sequence: the labels-shifted loss path computes the usual
    loss, in the fused chunked loss and the full-logits path."""
    from ds_finetune.loss import make_loss_fn
    batch = batch_of([13, 7, 16], seed=1)
    loss_fn = make_loss_fn(tiny_model, chunk)
    with torch.no_grad():
        usual = loss_fn(tiny_model, *batch)
        part = shard(batch, 0, 1, PAD)
        shifted = loss_fn(tiny_model, part.input_ids, None, part.labels, part.position_ids, shifted=True)
        with_facts = loss_fn(tiny_model, part.input_ids, None, part.labels, part.position_ids, part.facts,
                             shifted=True)  # the flash boundaries too: sdpa ignores them
    assert float(shifted) == pytest.approx(float(usual), rel=1e-6) and float(with_facts) == float(shifted)


# ------------------------------------------------------------------------------------------ layout

def test_world_is_data_parallel_times_sequence_parallel():
    cfg = load_config(TINY, ["train.sequence_parallel=2", "train.global_batch_size=8", "output_dir=x"])
    assert cfg.data_parallel_size(4) == 2
    assert cfg.batch_layout(4) == (4, 1, 8)   # global batch in sequences: 4 x 1 x 2 groups
    assert cfg.batch_layout(2) == (4, 2, 8)
    assert [SequenceGroup.of(cfg, 4, r) for r in range(4)] == [
        SequenceGroup(2, 0, 2, 0), SequenceGroup(2, 1, 2, 0), SequenceGroup(2, 0, 2, 1), SequenceGroup(2, 1, 2, 1)]


def test_dry_run_prints_the_dp_times_sp_layout():
    result = invoke("train", str(TINY), "--dry-run", "--num-gpus", "4", "train.sequence_parallel=2",
                    "train.zero_stage=3")
    assert result.exit_code == 0, result.stderr
    assert "# world_size=4 micro_batch_size=4 grad_accum=2 global_batch=16" in result.stdout
    assert "# layout: data_parallel=2 × sequence_parallel=2; up to 64 tokens of a sequence per rank" in result.stdout
    assert '"train_batch_size": 16' in result.stdout  # DeepSpeed counts sequences per data-parallel rank


@pytest.mark.parametrize("args, names", [
    (["--num-gpus", "3", "train.sequence_parallel=2"], ["train.sequence_parallel=2", "world size 3"]),
    (["--num-gpus", "8", "train.sequence_parallel=8"], ["train.sequence_parallel=8", "4 attention heads", "[1, 2, 4]"]),
    (["--num-gpus", "2", "train.sequence_parallel=2", "model.config.num_attention_heads=6",
      "model.config.num_key_value_heads=3"], ["train.sequence_parallel=2", "3 key/value heads"]),
    (["--num-gpus", "2", "train.sequence_parallel=2", "model.config.attn_implementation=eager"],
     ["train.sequence_parallel=2", "eager"]),
    (["--num-gpus", "2", "train.sequence_parallel=2", "data.packing=true"],
     ["data.packing: isolated", "train.sequence_parallel=2", "shared or none"]),
    (["--num-gpus", "4", "train.sequence_parallel=2", "train.global_batch_size=12"],
     ["train.global_batch_size 12", "data-parallel size=4×2", "sequence_parallel 2"]),
    (["train.sequence_parallel=0"], ["train.sequence_parallel"]),
], ids=["world", "heads", "kv-heads", "eager", "isolated-packing", "global-batch", "zero"])
def test_every_bad_layout_is_one_line(args, names):
    cli_error(str(TINY), "--dry-run", *args, names=names)


def test_an_eager_model_is_refused_when_built(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "_attn_implementation", "eager")
    with pytest.raises(UserError, match="needs sdpa, flex or flash attention; the model uses eager"):
        check_model(tiny_model, 2, isolate=False)


def test_a_second_head_geometry_in_one_process_is_refused_not_reshaped(tiny_model, monkeypatch):
    """Ulysses is registered once a process, for the first model's heads; a model of other heads would fail
    deep inside Ulysses' reshapes (a one-step test script met this), so `attach` names the mismatch."""
    from ds_finetune import sequence
    assert sequence.head_geometry(tiny_model) == "4 heads, 2 key/value heads of size 16"
    monkeypatch.setattr(sequence, "_registered", {(2, "sdpa"): ("4 heads, 2 key/value heads of size 2", None, None)})
    with pytest.raises(RuntimeError, match="registered in this process for 4 heads, 2 key/value heads of size 2; "
                                           "a model with 4 heads, 2 key/value heads of size 16"):
        sequence.attach(tiny_model, 2, 4)


def test_sequence_parallel_is_recorded_but_not_part_of_the_exact_fingerprint():
    one, two = (config_fingerprint(load_config(TINY, [f"train.sequence_parallel={n}", "output_dir=x"]), 8, "a" * 64)
                for n in (1, 2))
    assert changed_exact_keys(one, two) == []
    assert (one["harmless"]["train.sequence_parallel"], two["harmless"]["train.sequence_parallel"]) == (1, 2)


# ---------------------------------------------------------------------------------------- launched

ONE_STEP = [f"4x1:{s}" for s in ("s0", "s1", "s2", "s3", "s3:tied", "s1:c0:tied", "s2:c0")]
DP2_SP2 = ["2x1:s1", "2x1:s3:tied"]
# train.tiled_mlp in launched ZeRO-3 jobs at hidden 8 (heads of the config's size 16, so the 2-rank process
# keeps one Ulysses geometry): the first batch's ~31-token rows take 4 tiles on 1 rank, 2 a slice at SP=2.
TILED = ["4x1:s3:h8", "4x1:s3:h8:m"]


@pytest.mark.multiproc
def test_one_step_at_sp2_and_dp2_sp2_gives_the_loss_and_weights_of_sp1(tmp_path):
    from safetensors.torch import load_file
    script = str(harness.ROOT / "tests" / "scripts" / "one_step.py")
    for argv in ([harness.PY, script, str(tmp_path), *ONE_STEP, "4x1:s3:tied", *TILED],
                 harness.ranks_argv(script, [str(tmp_path), *[f"{s}:p2" for s in ONE_STEP], "4x1:s3:h8:m:p2"], 2),
                 harness.ranks_argv(script, [str(tmp_path), *[f"{s}:p2" for s in DP2_SP2]], 4)):
        proc = harness.run(argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = [(f"1-{s}", f"2-{s}:p2") for s in ONE_STEP] + [("1-4x1:s1", "4-2x1:s1:p2"), ("1-4x1:s3:tied",
                                                                                       "4-2x1:s3:tied:p2")]
    pairs += [("1-4x1:s3:h8", "1-4x1:s3:h8:m"), ("1-4x1:s3:h8", "2-4x1:s3:h8:m:p2")]
    for ref, got in pairs:
        loss_ref, loss_got = (json.loads((tmp_path / f"loss{r}.json").read_text()) for r in (ref, got))
        assert loss_got == pytest.approx(loss_ref, rel=1e-5), (ref, got)
        w_ref, w_got = (load_file(str(tmp_path / f"w{r}.safetensors")) for r in (ref, got))
        for name, w in w_ref.items():
            assert (w_got[name] - w).abs().max().item() <= 1e-5, (ref, got, name)
    initial = load_file(str(tmp_path / "init1-4x1:s3.safetensors"))
    moved = load_file(str(tmp_path / "w1-4x1:s3.safetensors"))
    assert max((moved[n] - w).abs().max().item() for n, w in initial.items()) > 1e-4  # the step did move them


# dropout off: SP=1 and SP=2 draw dropout masks over different shapes; eval batches of 3 rows (the
# micro-batch holds 2) so Ulysses meets batch sizes other than the one it was registered with.
SP_RUN = ["train.zero_stage=3", "model.config.attention_dropout=0.0", "eval.fraction=0.1", "eval.every_steps=5",
          "eval.micro_batch_size=3"]
SP2 = [*SP_RUN, "train.sequence_parallel=2"]


@pytest.mark.multiproc
def test_sigkill_at_sp2_resumes_bitwise_and_resumes_across_sp_degrees(tmp_path):
    ref, run, cross, wider = tmp_path / "ref", tmp_path / "run", tmp_path / "cross", tmp_path / "wider"
    harness.train(ref, SP2)
    killed = harness.train(run, SP2, fault="mid_accum:rank1@step5", expect_ok=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    assert harness.committed_steps(run / "checkpoints")[-1] == 4
    harness.copy_run(run, cross)
    harness.copy_run(run, wider)

    # SP=2 on 4 ranks (DP=2 x SP=2, grad_accum 1: the same global batch of 4): the ZeRO-3 partitions of 2
    # ranks are converted for 4
    wide = harness.train(wider, SP2, nproc=4, resume="auto")
    harness.assert_resumed(wide, step=4)
    assert "for ZeRO 3 on 4 ranks" in wide.stdout, wide.stdout[-2000:]
    harness.assert_close_run(wider, ref, rel=1e-5)

    harness.assert_resumed(harness.train(run, SP2, resume="auto"), step=4)  # the same SP: bitwise
    harness.assert_same_run(run, ref)
    harness.assert_same_final_weights(run, ref)

    # SP=2 -> SP=1 (2 data-parallel ranks, grad_accum 1: the same global batch of 4), killed at step 7 ...
    at_sp1 = harness.train(cross, SP_RUN, resume="auto", fault="mid_accum:rank0@step7", expect_ok=False)
    assert at_sp1.returncode == -9, at_sp1.stdout[-2000:]
    harness.assert_resumed(at_sp1, step=4)
    assert "was saved at train.sequence_parallel=2, this run uses 1" in at_sp1.stdout
    # ... -> SP=2 again from step 6
    back = harness.train(cross, SP2, resume="auto")
    harness.assert_resumed(back, step=6)
    assert "was saved at train.sequence_parallel=1, this run uses 2" in back.stdout
    harness.assert_close_run(cross, ref, rel=1e-5)
    evals = [(r["step"], r["eval_loss"]) for r in harness.metrics(ref) if "eval_loss" in r]
    got = [(r["step"], r["eval_loss"]) for r in harness.metrics(cross) if "eval_loss" in r]
    assert [s for s, _ in got] == [s for s, _ in evals] == [5, 10]  # step 5's evaluation ran at SP=1
    for (_, a), (_, b) in zip(evals, got):
        assert b == pytest.approx(a, rel=1e-5)


PAIRS = harness.ROOT / "data" / "tiny" / "preference.jsonl"


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "cpo", "kto", "reward"])
def test_every_preference_objective_takes_sequence_parallelism(objective):
    overrides = [f"train.objective={objective}", "data.format=preference", f"data.path={PAIRS}",
                 "train.sequence_parallel=2", "output_dir=x"]
    assert load_config(TINY, overrides).train.sequence_parallel == 2


PAIR_METRICS = ("loss", "eval_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "mean_token_accuracy",
                "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl", "eval_kl", "eval_rewards/chosen",
                "accuracy", "margin", "mean_reward", "eval_accuracy", "eval_margin", "eval_mean_reward")
UNPAIRED = harness.ROOT / "data" / "tiny" / "unpaired_preference.jsonl"


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto", "reward"])
def test_a_preference_objective_at_sp2_computes_sp1s_losses_and_metrics_and_dpo_resumes_bitwise(tmp_path, objective):
    """Each rank of the SP group runs its slice of every sequence; the group joins their per-target log-probs
    and each computes the loss (the reference pass too: its own data cache here, so it runs at SP=2). KTO's
    SP=1 run takes the other reference, a frozen copy of the base (kto.reference: model): the same values. A reward
    model's score is at each row's last real token: the group adds up the one slice's that holds it. SimPO's
    log-probs are per-token means: each rank divides by the whole sequence's target count, not its slice's."""
    data = ["data.format=unpaired_preference", f"data.path={UNPAIRED}"] if objective == "kto" else \
        ["data.format=preference", f"data.path={PAIRS}"]
    pair = [f"train.objective={objective}", *data]
    sp1, ref, run = tmp_path / "sp1", tmp_path / "ref", tmp_path / "run"
    env = {"DS_FINETUNE_CACHE": str(tmp_path / "cache")}
    if objective == "kto":  # its KL estimate is each micro-step's: the SP group's micro-batches, on one rank
        proc = harness.train(sp1, [*SP_RUN, *pair, "kto.reference=model"], nproc=1)
        assert "computing the reference log-probs" not in proc.stdout
    else:  # 2 data-parallel ranks: the same global batch of 4
        harness.train(sp1, [*SP_RUN, *pair, "train.grad_accum=1"])
    proc = harness.train(ref, [*SP2, *pair], env=env)
    assert objective in ("orpo", "simpo", "reward") or "computing the reference log-probs" in proc.stdout
    got, want = harness.metrics(ref), harness.metrics(sp1)
    assert [r["sample_ids"] for r in got] == [r["sample_ids"] for r in want]
    compared = 0
    for a, b in zip(want, got):
        for name in PAIR_METRICS:
            assert (name in a) == (name in b), (a["step"], name)
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (a["step"], name, a[name], b[name])
                compared += 1
    assert compared >= 10 * {"reward": 4, "simpo": 7}.get(objective, 8) and any("eval_loss" in r for r in got)
    if objective == "dpo":
        harness.kill_in_step5(run, [*SP2, *pair], env=env)
        harness.assert_resumed(harness.train(run, [*SP2, *pair], resume="auto", env=env), step=4)
        harness.assert_same_run(run, ref)
        harness.assert_same_metrics(run, ref, PAIR_METRICS)
