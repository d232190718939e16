"""`ds-finetune ckpt export`: a Hugging Face folder from a checkpoint of any ZeRO stage, loadable with
AutoModelForCausalLM.from_pretrained, holding exactly the trained weights; damaged checkpoints refused."""
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import harness
from ds_finetune.checkpoint import find_resumable_checkpoint

pytestmark = pytest.mark.multiproc
CLI = str(harness.BIN / "ds-finetune")


def weights_as_deepspeed_reads_them(info) -> dict:
    """The reference, independent of ds-finetune's conversion: DeepSpeed's own zero_to_fp32 for ZeRO 1-3,
    the saved module itself at ZeRO 0 (there the model is the fp32 master copy)."""
    if info.manifest["zero_stage"] == 0:
        module = torch.load(info.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {name: t.float() for name, t in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(info.path.parent), tag=info.tag)


def assert_exported_equals(out_dir, info):
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    expected = weights_as_deepspeed_reads_them(info)
    got = dict(model.named_parameters())
    assert got.keys() <= expected.keys()
    for name, t in got.items():
        assert torch.equal(t.detach(), expected[name]), name
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.chat_template and tok.eos_token == "<|eos|>"
    ids = tok("What is 2 plus 3?", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ckpt_export_from_any_stage_loads_in_transformers(saved_at_step4, tmp_path, stage):
    info, _ = find_resumable_checkpoint(saved_at_step4(stage) / "checkpoints")
    out = tmp_path / "hf"
    proc = subprocess.run([CLI, "ckpt", "export", str(info.path), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert_exported_equals(out, info)


def test_export_final_and_bf16(reference_run, tmp_path):
    run = reference_run(3, extra=["checkpoint.export_final=true"])
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    assert info.step == 10
    assert_exported_equals(run / "final_model", info)
    out = tmp_path / "bf16"
    subprocess.run([CLI, "ckpt", "export", str(info.path), str(out), "--dtype", "bf16"], check=True,
                   capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_export_refuses_a_damaged_checkpoint(saved_at_step4, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(saved_at_step4(2), run)
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    shard = next(info.path.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = subprocess.run([CLI, "ckpt", "export", str(info.path), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: export error:") and "corrupt" in proc.stderr
    assert not (tmp_path / "out").exists()
