"""2-rank CPU training at ZeRO 0-3, the global-batch loss, metrics.jsonl, world-size
independence. Runs are shared through the `reference_run` fixture (conftest.py)."""
import json
import math

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

import harness
from ds_finetune.config import load_config
from ds_finetune.data import load_tokenizer
from ds_finetune.sampler import epoch_permutation

pytestmark = pytest.mark.multiproc
STAGES = [0, 1, 2, 3]
KEYS = {"step", "loss", "learning_rate", "grad_norm", "epoch", "consumed_samples", "num_tokens", "time",
        "mean_token_accuracy", "sample_ids", "lr", "tokens"}  # lr and tokens: the old names, for one release


def predicted_sample_ids(steps: int, global_batch: int) -> list[list[int]]:
    """The sampler's promise, computed here from the data file and the seed alone (no packing)."""
    from ds_finetune.data import build_cache, cache_path, content_hash, read_cache, resolve_data_files
    cfg = load_config(harness.TINY, [*harness.BASE, "output_dir=/tmp/unused"])
    tok = load_tokenizer(cfg.model.tokenizer)
    files = resolve_data_files(str(harness.ROOT / cfg.data.path))
    h = content_hash(files, cfg.data.path, cfg.data.split)
    path = cache_path(cfg.data, h, tok)
    if not path.exists():
        build_cache(cfg.data, tok, files, h, path)
    data = read_cache(path, h)
    order = data.row_ids[epoch_permutation(data.num_rows, cfg.train.seed, 0)]
    return [order[i * global_batch:(i + 1) * global_batch].tolist() for i in range(steps)]


@pytest.mark.parametrize("stage", STAGES)
def test_metrics_jsonl_is_well_formed_and_loss_falls(reference_run, stage):
    out = reference_run(stage)
    rows = harness.metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for r in rows:
        assert set(r) == KEYS
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["consumed_samples"] == 8 * r["step"] and r["epoch"] == 0
        assert len(r["sample_ids"]) == 8
    assert [r["num_tokens"] for r in rows] == sorted(r["num_tokens"] for r in rows)
    assert all(r["tokens"] == r["num_tokens"] and r["lr"] == r["learning_rate"] for r in rows)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert all(0 <= r["mean_token_accuracy"] <= 1 for r in rows) and rows[-1]["mean_token_accuracy"] > 0
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]]) - 0.3
    # warmup_steps=2, lr 3e-3: step 1 uses lr/2, step 2 the full lr, then cosine decay
    assert rows[0]["learning_rate"] == pytest.approx(1.5e-3) and rows[1]["learning_rate"] == pytest.approx(3e-3)
    assert rows[-1]["learning_rate"] < rows[2]["learning_rate"]
    ds_config = json.loads((out / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["train_batch_size"] == 8
    assert yaml.safe_load((out / "run_config.yaml").read_text())["train"]["zero_stage"] == stage


@pytest.mark.parametrize("stage", [0, 3])
def test_sample_ids_are_the_samplers_prediction(reference_run, stage):
    rows = harness.metrics(reference_run(stage))
    assert [r["sample_ids"] for r in rows] == predicted_sample_ids(10, 8)


def test_losses_identical_across_zero_stages(reference_run):
    base = harness.metrics(reference_run(0))
    for stage in STAGES[1:]:
        rows = harness.metrics(reference_run(stage))
        assert [r["sample_ids"] for r in rows] == [r["sample_ids"] for r in base]
        for a, b in zip(base, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (stage, a["step"])


def test_one_and_two_ranks_same_global_batch_same_steps(reference_run):
    no_dropout = ["model.config.attention_dropout=0.0"]
    two = harness.metrics(reference_run(2, nproc=2, extra=no_dropout))
    one = harness.metrics(reference_run(2, nproc=1, extra=[*no_dropout, "train.grad_accum=4"]))
    assert [r["sample_ids"] for r in one] == [r["sample_ids"] for r in two]
    for a, b in zip(two, one):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


CHUNK_PAIRS = [(f"4x1:s{stage}:c0{tied}", f"4x1:s{stage}:c7{tied}") for stage in range(4) for tied in ("", ":tied")]


def assert_same_step(a: str, b: str, losses: dict, weights: dict) -> None:
    assert losses[b] == pytest.approx(losses[a], rel=1e-6), (a, b)
    for name, w in weights[a].items():
        diff = (weights[b][name] - w).abs().max().item()
        assert diff <= 1e-6 * max(1.0, w.abs().max().item()), (a, b, name, diff)


def test_same_global_batch_split_differently_gives_same_loss_and_weights(tmp_path):
    """Also: the chunked loss (7 target tokens a chunk) gives the full-logits path's loss and weights at
    every ZeRO stage, with tied and untied embeddings."""
    script = str(harness.ROOT / "tests" / "scripts" / "one_step.py")
    chunk_specs = [spec for pair in CHUNK_PAIRS for spec in pair]
    single = harness.run([harness.PY, script, str(tmp_path), "4x1", "2x2", "1x4", *chunk_specs])
    assert single.returncode == 0, single.stderr[-3000:]
    double = harness.run(harness.ranks_argv(script, [str(tmp_path), "1x2"], 2))
    assert double.returncode == 0, double.stderr[-3000:]
    runs = ["1-4x1", "1-2x2", "1-1x4", "2-1x2"] + [f"1-{spec}" for spec in chunk_specs]
    losses = {r: json.loads((tmp_path / f"loss{r}.json").read_text()) for r in runs}
    weights = {r: load_file(str(tmp_path / f"w{r}.safetensors")) for r in runs}
    for r in runs[1:4]:
        assert_same_step(runs[0], r, losses, weights)
    for full, chunked in CHUNK_PAIRS:
        assert_same_step(f"1-{full}", f"1-{chunked}", losses, weights)
    # the step really moved the weights (otherwise equality would prove nothing)
    initial = load_file(str(tmp_path / "init1-4x1.safetensors"))
    assert max((weights["1-4x1"][n] - w).abs().max().item() for n, w in initial.items()) > 1e-4
