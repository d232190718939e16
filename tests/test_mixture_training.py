"""Training on a data mixture with real ranks, at ZeRO 3 (and 1): a SIGKILL in the middle of a step resumes
bitwise (losses, sample ids, per-source training and eval losses), a resume on one rank continues the same samples,
per-source losses add up to the step's loss, and a changed mix continues from the checkpoint's position with
the new weights. (The order's own properties are in test_mixture.py, eval per source in test_evaluation.py.)

At ZeRO 3 dropout is off so that the resume on another world size can be compared within float noise (one
uninterrupted run and one killed run are shared); the ZeRO-1 kill keeps dropout on, so its resumed RNG counts."""
import re

import harness
from conftest import made_once
import pytest

from ds_finetune.checkpoint.layout import read_manifest
from ds_finetune.state import TrainState
from ds_finetune.config import load_config
from ds_finetune.data import epoch_order, load_tokenizer, prepare_training_data

pytestmark = pytest.mark.multiproc

STAGE = ["train.zero_stage=3"]
# Named eval sources at steps 5 and 10, one batch each per rank.
EVAL = ["eval.sources=[{path: data/tiny/text.jsonl, format: text, name: prose}, "
        "{path: data/tiny/chat.jsonl, format: chat}]", "eval.every_steps=5", "eval.max_batches=1"]


def mix(chat=0.6, text=0.3, pc=0.1) -> list[str]:
    return ["model.config.attention_dropout=0.0", *EVAL, "data.path=null",
            f"data.sources=[{{path: data/tiny/chat.jsonl, format: chat, weight: {chat}}}, "
            f"{{path: data/tiny/text.jsonl, format: text, weight: {text}}}, "
            f"{{path: data/tiny/prompt_completion.jsonl, format: prompt_completion, weight: {pc}}}]"]


NAMES = ("chat", "text", "prompt_completion")  # each source's default name: its file stem


def per_source(rows) -> list[dict]:
    return [{k: repr(v) for k, v in r.items() if k.startswith(("loss/", "tokens/", "eval_"))} for r in rows]


@pytest.fixture(scope="module")
def killed_in_step5(tmp_path_factory):
    """A 2-rank mixture run SIGKILLed in the middle of step 5 (rank 1, between micro-steps); its newest
    checkpoint is step 4. Each test resumes a copy."""
    def kill(out):  # once for the session: the workers running this module's tests share it
        proc = harness.train(out, [*STAGE, *mix()], fault="mid_accum:rank1@step5", expect_ok=False)
        assert proc.returncode == -9, proc.stdout[-2000:]
        assert harness.committed_steps(out / "checkpoints")[-1] == 4
    return made_once(tmp_path_factory, "mix-killed", kill)


def test_a_mixture_killed_mid_step_resumes_bitwise(reference_run, killed_in_step5, tmp_path):
    ref = reference_run(3, extra=tuple(mix()))
    out = harness.copy_run(killed_in_step5, tmp_path / "run")
    harness.assert_resumed(harness.train(out, [*STAGE, *mix()], resume="auto"), step=4)
    harness.assert_same_run(out, ref)
    got, want = harness.metrics(out), harness.metrics(ref)
    assert per_source(got) == per_source(want)
    evals = [r for r in want if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all({"eval_ppl", "eval_loss/prose", "eval_loss/chat"} <= set(r) for r in evals)
    # eval_loss is over every eval token, a token-weighted mean of the sources' losses: between them.
    assert all(min(r["eval_loss/prose"], r["eval_loss/chat"]) < r["eval_loss"]
               < max(r["eval_loss/prose"], r["eval_loss/chat"]) for r in evals)

    for row in want:  # per-source losses, weighted by their target tokens, are the step's loss
        tokens = {n: row[f"tokens/{n}"] for n in NAMES}
        assert sum(tokens.values()) > 0
        weighted = sum(row[f"loss/{n}"] * t for n, t in tokens.items() if t) / sum(tokens.values())
        assert weighted == pytest.approx(row["loss"], rel=1e-6)
    # 10 steps of 8 samples are 8 periods of the 6/3/1 blend: exactly 48, 24 and 8 samples. A mixture's
    # sample ids follow the sources' order in data.sources (400 rows each here).
    ids = [i for row in want for i in row["sample_ids"]]
    assert [sum(lo <= i < lo + 400 for i in ids) for lo in (0, 400, 800)] == [48, 24, 8]


def test_a_mixture_killed_mid_step_at_zero_1_with_dropout_resumes_bitwise(reference_run, tmp_path):
    """ZeRO 1, dropout on (the resumed RNG matters): the kill inside step 5 resumes to the uninterrupted
    run's losses, sample ids and per-source losses, bitwise."""
    run = ["train.zero_stage=1", *mix(), "model.config.attention_dropout=0.1"]
    ref = reference_run(1, extra=tuple(run[1:]))
    out = tmp_path / "run"
    proc = harness.train(out, run, fault="mid_accum:rank1@step5", expect_ok=False)
    assert proc.returncode == -9, proc.stdout[-2000:]
    harness.assert_resumed(harness.train(out, run, resume="auto"), step=4)
    harness.assert_same_run(out, ref)
    assert per_source(harness.metrics(out)) == per_source(harness.metrics(ref))


def test_a_mixture_saved_on_two_ranks_continues_the_same_samples_on_one(reference_run, killed_in_step5, tmp_path):
    ref = reference_run(3, extra=tuple(mix()))
    out = harness.copy_run(killed_in_step5, tmp_path / "run")
    proc = harness.train(out, [*STAGE, *mix()], nproc=1, resume="auto")
    harness.assert_resumed(proc, step=4)
    assert "grad_accum=4" in proc.stdout  # the global batch stays 8: 2 micro x 4 accum x 1 rank
    harness.assert_close_run(out, ref)  # steps 5-10 on one rank: the same sample ids, losses within 1e-5
    for got, want in zip(harness.metrics(out)[4:], harness.metrics(ref)[4:]):
        for n in NAMES:
            assert got[f"tokens/{n}"] == want[f"tokens/{n}"]
            if want[f"tokens/{n}"]:  # a source without targets in the step has no loss/<name>
                assert got[f"loss/{n}"] == pytest.approx(want[f"loss/{n}"], rel=1e-5), (got["step"], n)


def test_a_changed_mix_continues_from_the_position_with_the_new_weights(reference_run, tmp_path, monkeypatch):
    ref = reference_run(3, extra=tuple(mix()))
    out = harness.copy_run(ref, tmp_path / "run")
    new = mix(chat=0.1, text=0.1, pc=0.8)
    proc = harness.train(out, [*STAGE, *new, "train.max_steps=14"], resume="auto", flags=["--allow-config-change"])
    harness.assert_resumed(proc, step=10)  # steps 1-10 are ref's (copied), not recomputed under the new mix
    assert "changed data.sources.chat.weight, data.sources.prompt_completion.weight, data.sources.text.weight" \
        in proc.stdout, proc.stdout[-3000:]
    assert re.search(r"the data mix changed at step 10; weights now chat=0\.1, text=0\.1, prompt_completion=0\.8",
                     proc.stdout), proc.stdout[-3000:]
    listed = harness.run([str(harness.BIN / "ds-finetune"), "ckpt", "list", str(out), "--no-hash"])
    assert re.search(r"step_00000014 .* \(mix changed at step 10\)", listed.stdout), listed.stdout
    rows = harness.metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 15))

    # Steps 11-14 are the order's continuation of step 10's position under the new weights.
    monkeypatch.setenv("DS_FINETUNE_CACHE", harness.child_env()["DS_FINETUNE_CACHE"])
    cfg = load_config(harness.TINY, [*harness.BASE, *STAGE, *new, f"output_dir={out}"])
    data = prepare_training_data(cfg.data, load_tokenizer(str(harness.ROOT / cfg.model.tokenizer)))
    order = epoch_order(cfg, data)
    state = TrainState.from_manifest(read_manifest(ref / "checkpoints" / "step_00000010"))
    for row in rows[10:]:
        b = order.batch(state, 8)
        assert row["sample_ids"] == [int(x) for u in b.units for x in data.row_ids[u]]
        state.advance(b.position, 8, 0)
    later = [i for r in rows[10:] for i in r["sample_ids"]]
    assert sum(i >= 800 for i in later) == 26  # 80 % of 32: 0.8·32 = 25.6, the lag rule's 26
    before = {i for r in rows[:10] for i in r["sample_ids"]}
    assert not before & set(later)  # every source still in its first source-epoch: nothing seen twice
