"""Resume across stages and world sizes: a checkpoint saved under ZeRO stage A on W
ranks resumes under stage B and/or on W' ranks, converted automatically, with the same data order, the
same LR schedule and losses equal to float-reduction noise. One killed save run per stage is shared by
every resume from it."""
import shutil

import pytest
import torch

import harness
from ds_finetune.checkpoint import reshard
from ds_finetune.checkpoint.convert import convert_here
from ds_finetune.checkpoint.verify import find_resumable_checkpoint, verify_files

pytestmark = pytest.mark.multiproc
STAGES = [0, 1, 2, 3]


def assert_continues(proc, got_dir, ref_dir, from_step: int):
    harness.assert_resumed(proc, step=from_step)
    harness.assert_close_run(got_dir, ref_dir)
    assert len(harness.metrics(ref_dir)) > from_step


# Every stage saves once and loads once: a conversion goes through the stage-free copy (the saved stage's
# layout merged, then split for the target's), so a cycle runs every reader and every writer of it.
# test_converted_state_loads_exactly_into_every_stage checks the state each stage loads, tensor by tensor.
@pytest.mark.parametrize("saved, target", [(0, 1), (1, 2), (2, 3), (3, 0)])
def test_resume_under_another_zero_stage(saved_at_step4, reference_run, tmp_path, saved, target):
    run = tmp_path / f"to{target}"
    shutil.copytree(saved_at_step4(saved), run)
    proc = harness.train(run, [f"train.zero_stage={target}"], resume="auto")
    assert "converting" in proc.stdout and f"for ZeRO {target} on 2 ranks" in proc.stdout, proc.stdout[-2000:]
    assert_continues(proc, run, reference_run(saved), from_step=4)


def test_converted_state_equals_the_saved_state(saved_at_step4, tmp_path):
    """Weights and both Adam moments of a stage-3 save, consolidated, equal those of the same step saved
    at stage 0 (the unpartitioned ground truth): the partition merging is right for every tensor."""
    states = {}
    for stage in (0, 3):
        info, _ = find_resumable_checkpoint(saved_at_step4(stage) / "checkpoints")
        assert info.step == 4
        states[stage], meta = harness.consolidate(info)
        assert meta["optimizer_step"] == 4 and meta["global_steps"] == 4
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert states[0][key].keys() == states[3][key].keys()
        for name, t in states[0][key].items():
            # two runs at different stages agree to float noise; a partition-merge mistake would put
            # values of other elements here, off by the order of the values themselves
            diff = (states[3][key][name] - t).abs().max().item()
            assert diff <= 1e-4 * t.abs().max().item() + 1e-12, (key, name, diff)
        assert all(t.abs().sum() > 0 for t in states[0][key].values())


def test_converted_state_loads_exactly_into_every_stage(saved_at_step4, reference_run, tmp_path):
    """The Adam moments and weights read back from an engine of each stage equal the converted ones; in
    bf16 the fp32 masters too (not the bf16 rounding the engine built them from), at ZeRO 0 as well
    (where DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer)."""
    info, _ = find_resumable_checkpoint(saved_at_step4(3) / "checkpoints")
    target = convert_here(info)
    out = tmp_path / "roundtrip.json"
    proc = harness.run(harness.ranks_argv(harness.ROOT / "tests" / "scripts" / "roundtrip_resharded.py",
                                          [str(target), str(out), "0", "1", "2", "3", "0:bf16", "1:bf16",
                                           "2:bf16", "3:bf16"], 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(out.read_text())
    assert len(result) == 8
    for target, r in result.items():
        assert r["max_abs_diff"] == 0.0, (target, r)
        assert r["global_steps"] == 4
    # the schedule's position came back: every engine's lr is the one the uninterrupted run used at step 5
    assert {r["lr"] for r in result.values()} == {harness.metrics(reference_run(3))[4]["learning_rate"]}


def test_resume_on_one_rank_keeps_global_batch_and_order(reference_run, tmp_path):
    no_dropout = ["model.config.attention_dropout=0.0"]
    saved = tmp_path / "saved"
    proc = harness.train(saved, ["train.zero_stage=2", *no_dropout], fault="after_step@step6", expect_ok=False)
    assert proc.returncode == -9
    resumed = harness.train(saved, ["train.zero_stage=3", *no_dropout], nproc=1, resume="auto")
    assert "grad_accum=4" in resumed.stdout  # 2 micro × 2 accum × 2 ranks = 2 × 4 × 1
    assert_continues(resumed, saved, reference_run(2, extra=no_dropout), from_step=5)


def test_resume_on_two_ranks_from_one(reference_run, tmp_path):
    no_dropout = ["model.config.attention_dropout=0.0"]
    saved = tmp_path / "saved"
    proc = harness.train(saved, ["train.zero_stage=1", "train.grad_accum=4", *no_dropout], nproc=1,
                         fault="after_step@step6", expect_ok=False)
    assert proc.returncode == -9
    resumed = harness.train(saved, ["train.zero_stage=1", "train.grad_accum=4", *no_dropout], resume="auto")
    assert "grad_accum=2" in resumed.stdout
    assert_continues(resumed, saved, reference_run(2, extra=no_dropout), from_step=5)


def test_a_global_batch_the_new_world_cannot_split_is_a_clear_error(saved_at_step4, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_at_step4(2), run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = harness.train(run, ["train.zero_stage=2", "train.micro_batch_size=3"], nproc=1, resume="auto",
                         expect_ok=False)
    harness.assert_one_line_error(proc, "global batch 8", "micro_batch_size in [1, 2, 4, 8]", code=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def whole_model_consolidation(info) -> dict:
    """The reference: every file loaded whole (no mapping), the ranks' flat partitions merged for the
    whole model at once by DeepSpeed's zero_to_fp32 (weights) and its merge functions applied to the
    moments, which share the fp32 partitions' layout; stage 0 straight from the torch optimizer state."""
    from deepspeed.utils import zero_to_fp32 as z

    if info.manifest["zero_stage"] == 0:
        ms = torch.load(info.path / "mp_rank_00_model_states.pt", weights_only=False)
        names = [n for group in ms["param_group_names"] for n in group]
        index = [i for group in ms["optimizer"]["param_groups"] for i in group["params"]]
        out = {"weights": {n: ms["module"][n].float() for n in names}}
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = {n: ms["optimizer"]["state"][i][key] for n, i in zip(names, index)}
        return out
    out = {"weights": {k: v.float() for k, v in z.get_fp32_state_dict_from_zero_checkpoint(
        str(info.path.parent), tag=info.tag).items()}}
    model_states = z.parse_model_states(z.get_model_state_files(str(info.path)))
    files = z.get_optim_files(str(info.path))
    osds = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    stage = info.manifest["zero_stage"]
    for key in ("exp_avg", "exp_avg_sq"):
        merged = {}
        if stage <= 2:
            flats = [[s[key] for _, s in sorted(o["base_optimizer_state"]["state"].items())] for o in osds]
            z._zero2_merge_trainable_params(merged, len(files), flats, model_states, osds[0].get("param_alignment_paddings"))
        else:
            flats = [[s[key] for _, s in sorted(o["optimizer_state_dict"]["state"].items())] for o in osds]
            z._zero3_merge_trainable_params(merged, len(files), flats, model_states)
        out[key] = {k: v.contiguous() for k, v in merged.items()}
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_streamed_conversion_equals_a_whole_model_consolidation(saved_at_step4, tmp_path, stage):
    """The converted copy, written as two ranks' shares in small shards from memory-mapped files one
    tensor at a time, holds bitwise the weights and both moments of a whole-model consolidation."""
    run = shutil.copytree(saved_at_step4(stage), tmp_path / "run")
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    src = reshard.open_source(info)
    tmp = info.path / ".resharded.tmp-test"
    tmp.mkdir()
    parts = [reshard.write_share(src, reshard.share_of(src.names, src.shapes, r, 2), tmp, r, shard_bytes=20_000)
             for r in range(2)]
    assert all(part["files"] for part in parts)  # both ranks converted a share
    target = reshard.commit(reshard.resharded_dir(info), tmp, parts, reshard.source_meta(info, src))
    assert len(list(target.glob("weights-*.safetensors"))) > 2  # several shards per key
    copy = reshard.open_resharded(target, lambda m: verify_files(target, m))
    expected = whole_model_consolidation(info)
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert sorted(copy.names) == sorted(expected[key]), key
        for name, t in expected[key].items():
            got = copy.read(name, key)
            assert got.dtype == torch.float32 and torch.equal(got, t.float()), (key, name)
    assert copy.meta["optimizer_step"] == 4 and copy.meta["global_steps"] == 4


def test_a_crash_or_a_hang_mid_conversion_is_never_used_and_resume_converts_again(saved_at_step4, reference_run,
                                                                                  tmp_path):
    run = shutil.copytree(saved_at_step4(2), tmp_path / "run")
    # rank 1 hangs before hashing its share of the checkpoint, then after writing its conversion share:
    # rank 0 gives up on it in one line instead of waiting forever
    for fault, doing in [("hang_verify:rank1", "verifying"), ("hang_convert:rank1", "converting")]:
        proc = harness.train(run, ["train.zero_stage=3"], resume="auto", fault=fault, expect_ok=False,
                             env={"DS_FINETUNE_STALL_S": "4"})
        harness.assert_one_line_error(proc, f"rank 1 has shown no progress {doing}", "for 4 s", "start it again")
    proc = harness.train(run, ["train.zero_stage=3"], resume="auto", fault="mid_convert", expect_ok=False)
    assert proc.returncode == -9, proc.stdout[-2000:]
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    assert info.step == 4 and not reshard.has_resharded(info)
    assert list(info.path.glob(".resharded.tmp-*")) and list(info.path.glob(".resharded.tmp-*/*.safetensors"))
    proc = harness.train(run, ["train.zero_stage=3"], resume="auto")
    assert "2 ranks share the work" in proc.stdout
    assert not list(info.path.glob(".resharded.tmp-*"))  # the leftover went; it was never read
    assert_continues(proc, run, reference_run(2), from_step=4)


def test_a_damaged_converted_copy_is_a_clear_error(saved_at_step4, tmp_path):
    run = shutil.copytree(saved_at_step4(0), tmp_path / "run")
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    target = convert_here(info, shard_bytes=20_000)
    shard = next(target.glob("exp_avg-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\1")
    # one rank: its one error line is the whole output
    proc = harness.train(run, ["train.zero_stage=2"], nproc=1, resume="auto", expect_ok=False)
    harness.assert_one_line_error(proc, "converted copy", "damaged", "delete it")
