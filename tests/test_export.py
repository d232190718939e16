"""`ds-finetune ckpt export`: a Hugging Face folder from a checkpoint of any ZeRO stage, loadable with
AutoModelForCausalLM.from_pretrained, holding exactly the trained weights; damaged checkpoints refused."""
import enum
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import harness
from ds_finetune.checkpoint.verify import find_resumable_checkpoint

pytestmark = pytest.mark.multiproc
CLI = str(harness.BIN / "ds-finetune")


def saved_weights(info) -> dict:
    """The reference, independent of the streamed export: DeepSpeed's own zero_to_fp32 (stages 1-3), or
    the module saved whole (stage 0)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if info.manifest["zero_stage"] == 0:
        return {k: v.float() for k, v in torch.load(info.path / "mp_rank_00_model_states.pt",
                                                    weights_only=False)["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(info.path.parent), tag=info.tag)


def assert_exported_equals(out_dir, info):
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    expected = saved_weights(info)
    got = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name].detach(), t), name
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


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_our_writers_checkpoint_verifies_and_loads_in_deepspeeds_own_loader_and_zero_to_fp32(saved_at_step4, stage):
    """For users who leave us: the files our writer makes (no zip CRC32, O_DIRECT, hashed as written; at ZeRO
    2 the model states striped by both ranks) pass `ckpt verify`, load in DeepSpeed's own
    TorchCheckpointEngine.load (plain torch.load) exactly as through our safe loader, and DeepSpeed's
    zero_to_fp32 reads them (test_ckpt_export_from_any_stage_loads_in_transformers compares its weights with
    our export)."""
    import zipfile

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from ds_finetune.checkpoint import ds_internals

    info, _ = find_resumable_checkpoint(saved_at_step4(stage) / "checkpoints")
    model_states = info.manifest["files"][ds_internals.model_states_file(info.path).name]
    assert len(model_states.get("stripes_sha256", [])) == (2 if stage == 2 else 0)  # ZeRO 0's holds the optimizer
    verify = subprocess.run([CLI, "ckpt", "verify", str(info.path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stderr
    files = sorted(info.path.glob("*.pt"))
    assert files and set(f.name for f in files) <= set(info.manifest["files"])
    for f in files:
        with zipfile.ZipFile(f) as z:  # written by our writer: no record carries a CRC32
            assert {i.CRC for i in z.infolist()} == {0}, f.name
        ours = ds_internals.load_checkpoint_file(f)
        theirs = TorchCheckpointEngine().load(str(f), map_location="cpu")
        assert_same_state(theirs, ours, f.name)
    weights = saved_weights(info)  # DeepSpeed's zero_to_fp32 at stage 3
    module = ds_internals.load_checkpoint_file(ds_internals.model_states_file(info.path))["module"]
    assert weights.keys() == module.keys() and all(torch.isfinite(t).all() for t in weights.values())


def assert_same_state(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__") and not isinstance(a, enum.Enum):  # DeepSpeed's allowed classes
        assert type(a) is type(b), where
        assert_same_state(vars(a), vars(b), where)
    else:
        assert type(a) is type(b) and (a == b or a != a), where


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


def test_export_in_shards_of_a_given_size(saved_at_step4, tmp_path):
    """--max-shard-size: several files of at most that size plus the index save_pretrained writes, loaded
    by from_pretrained with the same weights; a size that is not one is a one-line error."""
    import json
    info, _ = find_resumable_checkpoint(saved_at_step4(3) / "checkpoints")
    out = tmp_path / "hf"
    proc = subprocess.run([CLI, "ckpt", "export", str(info.path), str(out), "--max-shard-size", "200KB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    largest = max(t.numel() * 4 for t in saved_weights(info).values())
    assert all(p.stat().st_size <= max(200_000, largest) + 4096 for p in shards)  # + the header
    assert_exported_equals(out, info)
    bad = subprocess.run([CLI, "ckpt", "export", str(info.path), str(tmp_path / "x"), "--max-shard-size", "big"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: export error: --max-shard-size 'big'")
    assert "Traceback" not in bad.stderr
    # the export's progress (a bar in a terminal): every byte hashed and every weight read is reported
    from ds_finetune.checkpoint.export import export_checkpoint
    seen = {}

    def bar(desc, total):
        seen[desc] = [total, 0]
        return lambda n: seen[desc].__setitem__(1, seen[desc][1] + n)

    export_checkpoint(info.path, tmp_path / "hf2", max_shard_size="200KB", bar=bar)
    assert seen["hashing"] == [info.size, info.size] and info.size > 0
    assert seen["reading weights"] == [sum(t.numel() * 4 for t in saved_weights(info).values())] * 2


def test_export_of_tied_embeddings_matches_save_pretrained(tmp_path):
    """Tied input/output embeddings: only the embedding is stored, as save_pretrained stores it, and the
    loaded model ties the output layer to it again."""
    run = tmp_path / "run"
    harness.train(run, ["train.zero_stage=3", "model.config.tie_word_embeddings=true", "train.max_steps=2"], nproc=1)
    info, _ = find_resumable_checkpoint(run / "checkpoints")
    out = tmp_path / "hf"
    subprocess.run([CLI, "ckpt", "export", str(info.path), str(out)], check=True, capture_output=True)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_exported_equals(out, info)
