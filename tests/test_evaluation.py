"""Evaluation during training: the held-out loss at a cadence on every rank, safe under ZeRO-3 with an eval
set the world size does not divide, without changing a bit of training, exact across a resume; the best
checkpoint by eval loss survives retention."""
import json
import math
import signal

import numpy as np
import pytest
import torch

import harness
from conftest import made_once
from ds_finetune.checkpoint.layout import MANIFEST, apply_retention, best_checkpoint, tag_for_step
from ds_finetune.config import load_config
from ds_finetune.data import load_tokenizer
from ds_finetune.dist import seed_everything
from ds_finetune.errors import UserError
from ds_finetune.evaluate import build_evaluator, held_out_rows
from ds_finetune.loss import full_loss_sum
from ds_finetune.model import build_model
from ds_finetune.objectives.sft import SFT


def eval_file(tmp_path, rows=13, name="chat"):
    """The last `rows` rows of data/tiny/NAME.jsonl (never in the first steps' batches) as a file."""
    lines = (harness.ROOT / "data" / "tiny" / f"{name}.jsonl").read_text().splitlines()[-rows:]
    path = tmp_path / f"{name}-eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_overrides(path):
    return [f"eval.path={path}", "eval.every_steps=3", "eval.micro_batch_size=2", "checkpoint.keep_best=true"]


@pytest.fixture(scope="session")
def evaluating(tmp_path_factory) -> list[str]:
    """The overrides of harness.BASE's runs that evaluate a held-out set every 3 steps (one file for the
    session, so those runs are reference_run's, shared)."""
    return eval_overrides(made_once(tmp_path_factory, "eval-file", eval_file) / "chat-eval.jsonl")


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_eval_changes_no_training_bit_and_runs_on_a_set_the_ranks_do_not_divide(reference_run, evaluating, stage):
    run = reference_run(stage, extra=tuple(evaluating))
    harness.assert_same_run(run, reference_run(stage))
    rows = harness.metrics(run)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 9, 10]  # the cadence and one at the end
    assert all(math.isfinite(v) and v > 0 for v in evals.values())
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in rows if "eval_loss" in r)
    assert evals[10] < evals[3]  # it measures the model: training lowers it


@pytest.mark.multiproc
def test_eval_losses_after_a_kill_and_resume_equal_the_uninterrupted_runs(reference_run, evaluating, tmp_path):
    ref, run = reference_run(3, extra=tuple(evaluating)), tmp_path / "run"
    overrides = ["train.zero_stage=3", *evaluating]
    killed = harness.train(run, overrides, fault="mid_accum:rank1@step7", expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    harness.assert_resumed(harness.train(run, overrides, resume="auto"), step=6)
    harness.assert_same_run(run, ref)
    got = [(r["step"], repr(r.get("eval_loss"))) for r in harness.metrics(run)]
    assert got == [(r["step"], repr(r.get("eval_loss"))) for r in harness.metrics(ref)]
    listing = json.loads(harness.run([str(harness.BIN / "ds-finetune"), "ckpt", "list", str(run), "--json"]).stdout)
    assert [r["step"] for r in listing if r["best_eval"]] == [best_step(run)]


def best_step(run):
    evals = [(r["eval_loss"], r["step"]) for r in harness.metrics(run) if "eval_loss" in r]
    return min(evals)[1]


def fake_checkpoint(ckpt_dir, step, eval_loss=None):
    tag = ckpt_dir / tag_for_step(step)
    tag.mkdir(parents=True)
    state = {"step": step, "eval_loss": eval_loss, "eval_step": step if eval_loss is not None else 0}
    (tag / MANIFEST).write_text(json.dumps({"step": step, "files": {}, "trainer_state": state}))


def test_keep_best_survives_keep_last(tmp_path):
    for step, loss in [(1, 3.0), (2, 1.5), (3, 2.0), (4, None), (5, 2.5)]:
        fake_checkpoint(tmp_path, step, loss)
    assert best_checkpoint(tmp_path).name == tag_for_step(2)
    apply_retention(tmp_path, keep_last=1, newest_committed=5, keep_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for_step(2), tag_for_step(5)]
    apply_retention(tmp_path, keep_last=1, newest_committed=5, keep_best=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for_step(5)]


def test_held_out_rows_are_a_seeded_split_never_trained_on():
    train, held = held_out_rows(400, 0.1, seed=1234)
    assert len(held) == 40 and len(train) == 360 and not set(train) & set(held)
    again_train, again_held = held_out_rows(400, 0.1, seed=1234)
    assert list(held) == list(again_held) and list(held) != list(held_out_rows(400, 0.1, seed=7)[1])


def test_held_out_groups_are_whole_conversations():
    groups = np.repeat(np.arange(50), [1 + i % 3 for i in range(50)])  # a conversation's turns are neighbours
    train, held = held_out_rows(len(groups), 0.2, seed=1234, groups=groups)
    assert sorted([*train, *held]) == list(range(len(groups)))
    assert not set(groups[train]) & set(groups[held])
    assert len(set(groups[held])) == 10


# ---------------------------------------------------------------------------------------- eval per source

class Engine(torch.nn.Module):
    """What the evaluator and the full-logits loss use of a DeepSpeed engine: calling it, `module`, `device`."""

    def __init__(self, model):
        super().__init__()
        self.module, self.device = model, torch.device("cpu")

    def forward(self, **inputs):
        return self.module(**inputs)


def scores_of(tmp_path, overrides):
    """The scores of one evaluation of the tiny model (its seeded initial weights) on one rank."""
    cfg = load_config(harness.TINY, ["train.loss_chunk_tokens=0", "eval.micro_batch_size=2", "data.num_proc=1",
                                     f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
                                     *overrides])
    tok = load_tokenizer(str(harness.ROOT / cfg.model.tokenizer))
    evaluator, train_rows = build_evaluator(cfg, tok, None, rank=0, world=1)
    assert train_rows is None  # named sources or eval.path: every training row is trained on
    seed_everything(cfg.train.seed)
    model = build_model(cfg, {})
    objective = SFT(None, None, full_loss_sum, tok.pad_token_id, False, 0)
    return evaluator, evaluator.evaluate(Engine(model), objective), model


def direct_loss(model, data, rows):
    """(summed token loss, targets) of `rows`, each row alone through the model: no padding, no loss code."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in rows:
            ids, mask = (torch.as_tensor(np.array(a)) for a in data.row(int(i)))
            logits = model(input_ids=ids[None].long()).logits[0, :-1].double()
            targets = mask[1:].bool()
            total += float(torch.nn.functional.cross_entropy(logits[targets], ids[1:][targets].long(), reduction="sum"))
            count += int(targets.sum())
    return total, count


@pytest.mark.parametrize("max_batches", [0, 2])
def test_each_named_source_reports_the_loss_it_has_as_the_only_eval_set(one_rank_group, tmp_path, max_batches):
    chat, text = eval_file(tmp_path, 7), eval_file(tmp_path, 5, "text")
    named = f"eval.sources=[{{path: {chat}}}, {{path: {text}, format: text, name: prose}}]"
    evaluator, scores, model = scores_of(tmp_path, [named, f"eval.max_batches={max_batches}"])
    assert set(scores) == {"eval_loss", "eval_ppl", "eval_loss/chat-eval", "eval_loss/prose"}

    # Each source's loss is bitwise that of a run whose eval set is that source alone (eval.path).
    _, alone, _ = scores_of(tmp_path, [f"eval.path={chat}", f"eval.max_batches={max_batches}"])
    assert scores["eval_loss/chat-eval"] == alone["eval_loss"]
    _, alone, _ = scores_of(tmp_path, ["data.format=text", f"eval.path={text}", f"eval.max_batches={max_batches}"])
    assert scores["eval_loss/prose"] == alone["eval_loss"]

    # And it is the global-token mean over that source's rows (max_batches: per source), computed directly;
    # eval_loss is the mean over every eval token, not the mean of the sources' means.
    seen = {"chat-eval": 7, "prose": 5} if max_batches == 0 else {"chat-eval": 4, "prose": 4}
    sums = {}
    for s, name in enumerate(evaluator.names):
        base = evaluator.data.bases[s]
        sums[name] = direct_loss(model, evaluator.data, range(base, base + seen[name]))
        assert scores[f"eval_loss/{name}"] == pytest.approx(sums[name][0] / sums[name][1], rel=1e-5)
    overall = sum(t for t, _ in sums.values()) / sum(n for _, n in sums.values())
    assert scores["eval_loss"] == pytest.approx(overall, rel=1e-5)
    assert scores["eval_ppl"] == pytest.approx(math.exp(scores["eval_loss"]))


@pytest.mark.parametrize("overrides, needle", [
    (["eval.sources=[{path: a.jsonl}, {path: b/a.jsonl}]"], "eval.sources: duplicate source name 'a'"),
    (["eval.sources=[]"], "eval.sources: list at least one source"),
    (["eval.sources=[{path: a.jsonl, weight: 1}]"], "eval.sources.0.weight: unknown key"),
    (["eval.sources=[{path: a.jsonl}]", "eval.path=b.jsonl"], "set one of eval.path, eval.sources or eval.fraction"),
    (["train.objective=dpo", "data.format=preference", "eval.sources=[{path: a.jsonl, format: chat}]"],
     "eval.sources of train.objective dpo need format preference (got chat)"),
    (["train.objective=dpo", "data.format=preference", "data.path=null",
      "data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl, format: chat, weight: 1}]"],
     "train.objective dpo needs data.format preference (got chat, preference)"),
    (["data.path=null", "data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl, format: preference, weight: 1}]"],
     "data.format preference needs a pair objective"),
])
def test_bad_eval_sources_are_one_line_config_errors(overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(harness.TINY, overrides)
    assert needle in e.value.message and "\n" not in e.value.message and e.value.exit_code == 2


def test_a_missing_eval_source_file_is_a_one_line_data_error(tmp_path):
    with pytest.raises(UserError) as e:
        scores_of(tmp_path, [f"eval.sources=[{{path: {tmp_path / 'nowhere.jsonl'}}}]"])
    assert "nowhere.jsonl: no such file or folder" in e.value.message and "eval.sources" in e.value.message
    assert "\n" not in e.value.message
