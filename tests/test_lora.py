"""LoRA (`model.lora`, through peft) on a tiny base model saved into a local folder: exact resume at ZeRO 2
and 3 (DoRA too) and across stages, checkpoints that hold only the adapters, exports that compute what the training
engine computed, and a refused resume on another base."""
import json
import shutil
import signal
import subprocess

import pytest
import torch

import harness
from conftest import made_once
from ds_finetune.checkpoint.verify import find_resumable_checkpoint

pytestmark = pytest.mark.multiproc
CLI = str(harness.BIN / "ds-finetune")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The tiny model (dropout on, as in harness.BASE) saved as a pretrained folder: the frozen base."""
    return made_once(tmp_path_factory, "lora-base", lambda out: harness.save_tiny_model(out / "model", seed=7)) / "model"


def lora(base, stage: int, dora: bool = False) -> list[str]:
    # Evaluation at the end (held-out rows) measures the engine's final weights, base included.
    return ["model.config=null", f"model.name_or_path={base}", "model.lora.r=4", "model.lora.alpha=8",
            "train.max_steps=6", f"train.zero_stage={stage}", "eval.fraction=0.05",
            *(["model.lora.use_dora=true"] if dora else [])]


@pytest.fixture(scope="module")
def lora_reference(base_model, tmp_path_factory):
    def get(stage: int, dora: bool = False):  # each once for the session, whichever worker asks first
        return made_once(tmp_path_factory, f"lora-ref-stage{stage}{'-dora' if dora else ''}",
                         lambda out: harness.train(out, lora(base_model, stage, dora)))
    return get


@pytest.mark.parametrize("stage, dora", [(3, False), (2, True)], ids=["3", "2-dora"])
def test_lora_sigkill_resumes_bitwise_and_stage3_resumes_under_stage2(base_model, lora_reference, tmp_path, stage,
                                                                      dora):
    run = tmp_path / "run"
    killed = harness.train(run, lora(base_model, stage, dora), fault="mid_accum:rank1@step5", expect_ok=False)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stdout[-2000:]
    assert harness.committed_steps(run / "checkpoints") == [3, 4]
    if stage == 3:
        harness.copy_run(run, tmp_path / "to-stage2")
    harness.assert_resumed(harness.train(run, lora(base_model, stage, dora), resume="auto"), step=4)
    harness.assert_same_run(run, lora_reference(stage, dora))
    harness.assert_same_final_weights(run, lora_reference(stage, dora))
    if stage == 3:  # the converted copy carries the adapters and their moments, not the base
        resumed = harness.train(tmp_path / "to-stage2", lora(base_model, 2), resume="auto")
        harness.assert_resumed(resumed, step=4)
        assert "converting" in resumed.stdout
        harness.assert_close_run(tmp_path / "to-stage2", lora_reference(3), rel=1e-5)


def test_lora_checkpoint_holds_the_adapters_and_exports_compute_what_training_did(base_model, lora_reference,
                                                                                   tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    ref = lora_reference(3)  # the kill test's reference: ZeRO-3 partitions, consolidated
    info, _ = find_resumable_checkpoint(ref / "checkpoints")
    trained = harness.consolidate(info, weights_only=True)[0]["weights"]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained), sorted(trained)[:5]
    assert any(t.abs().sum() > 0 for n, t in trained.items() if ".lora_B." in n), "the adapters never trained"
    base_bytes = (base_model / "model.safetensors").stat().st_size
    assert info.size < base_bytes  # three fp32 copies of the adapters, no base

    for flags, out in (([], tmp_path / "adapter"), (["--merge"], tmp_path / "merged")):
        proc = subprocess.run([CLI, "ckpt", "export", str(info.path), str(out), *flags], capture_output=True,
                              text=True, env=harness.child_env(), cwd=harness.ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model),
                                             tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()

    # The run's last eval loss was computed by the training engine with its final weights: the base as it
    # was in the engine after training plus the adapters. Both exports must give the same loss on the
    # same held-out rows (so the engine's base was the unchanged base), and the same logits.
    logged = [r for r in harness.metrics(ref) if "eval_loss" in r][-1]
    batches = held_out_batches(ref)
    for model in (with_adapter, merged):
        assert eval_loss(model, batches) == pytest.approx(logged["eval_loss"], rel=1e-5)
    ids = batches[0].input_ids
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def held_out_batches(run_dir):
    from ds_finetune.config import load_config
    from ds_finetune.data import collate, load_tokenizer, prepare_data
    from ds_finetune.evaluate import held_out_rows

    cfg = load_config(run_dir / "run_config.yaml")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    data = prepare_data(cfg.data, tok)
    _, rows = held_out_rows(data.num_rows, cfg.eval.fraction, cfg.train.seed)
    return [collate(data, rows[i:i + 4].reshape(-1, 1), tok.pad_token_id) for i in range(0, len(rows), 4)]


def eval_loss(model, batches) -> float:
    from ds_finetune.loss import full_loss_sum

    total = targets = 0.0
    with torch.no_grad():
        for batch in batches:
            total += float(full_loss_sum(model, batch.input_ids, batch.attention_mask, batch.labels))
            targets += float((batch.labels[:, 1:] != -100).sum())
    return total / targets


def test_lora_resume_on_another_base_is_refused(base_model, lora_reference, tmp_path):
    """The checkpoint holds only the adapters, so the base's files are part of the run: other weights are
    refused (naming the file), a moved copy of the same files is not the problem named."""
    from safetensors.torch import load_file, save_file

    run = harness.copy_run(lora_reference(3), tmp_path / "run")
    other = shutil.copytree(base_model, tmp_path / "other-base")
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    overrides = [o if not o.startswith("model.name_or_path=") else f"model.name_or_path={other}"
                 for o in lora(base_model, 3)]
    before = harness.snapshot(run / "checkpoints")
    proc = harness.train(run, [*overrides, "train.max_steps=8"], resume="auto", expect_ok=False)
    line = harness.assert_one_line_error(proc, "model.base_files.model.safetensors", "--allow-config-change")
    assert "model.name_or_path" not in line  # the files are the identity, not where they lie
    assert harness.snapshot(run / "checkpoints") == before


def test_lora_export_refuses_a_checkpoint_carrying_a_payload(lora_reference, tmp_path):
    """An optimizer file of a LoRA checkpoint given a pickled call, the manifest rewritten to match: both
    exports refuse it in one line and the call never runs (tests/test_safe_load.py has the other loads)."""
    from test_safe_load import craft

    run = harness.copy_run(lora_reference(3), tmp_path / "run")
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    marker = tmp_path / "payload-ran"
    craft(info.path, marker, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    for flags in ([], ["--merge"]):
        proc = subprocess.run([CLI, "ckpt", "export", str(info.path), str(tmp_path / "out"), *flags],
                              capture_output=True, text=True, env=harness.child_env(), cwd=harness.ROOT)
        harness.assert_one_line_error(proc, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "posix.system")
    assert not marker.exists() and not (tmp_path / "out").exists()
