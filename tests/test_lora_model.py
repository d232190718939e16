"""LoRA in-process: what `model.lora` builds, its config errors, and the base's place in the fingerprint."""
import sys

import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.errors import UserError

LORA = ["model.lora.r=4", "model.lora.alpha=8"]


def build(overrides, rng_seed: int):
    return harness.tiny_model(*overrides, seed=rng_seed)


def test_lora_freezes_the_base_and_starts_the_adapters_from_the_seed():
    plain = build([], 0)
    a, b = build(LORA, 0), build(LORA, 99)  # different RNG before the build: the same adapters
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n for n, _ in a.named_parameters()} == {n for n, _ in b.named_parameters()}
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            assert torch.equal(pa, pb), name
    # q_proj and the MLP are adapted (all-linear), the LM head is not
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= adapted and "lm_head" not in adapted
    # the base is the plain model's weights, untouched
    base = dict(a.get_base_model().named_parameters())
    for name, p in plain.named_parameters():
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base[key], p), name


def test_lora_on_chosen_modules_with_a_full_head():
    from ds_finetune.lora import hf_model
    from ds_finetune.loss import ChunkedLoss

    model = build([*LORA, "model.lora.target_modules=[q_proj,v_proj]", "model.lora.modules_to_save=[lm_head]"], 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n} == {"q_proj", "v_proj"}
    head = [n for n in trainable if "lm_head" in n]
    assert head == ["base_model.model.lm_head.modules_to_save.default.weight"]
    # the chunked loss runs the trained copy of the head, not the frozen original
    chunked = ChunkedLoss(hf_model(model), 16)
    assert chunked.head.weight is dict(model.named_parameters())[head[0]]


@pytest.mark.parametrize("override, needle", [
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.lora.rank=8", "model.lora.rank: unknown key"),
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.init_lora_weights=pissa", "pissa is not supported: it rewrites the base weights"),
    ("model.lora.init_lora_weights=pissa_niter_4", "pissa_niter_4 is not supported"),
    ("model.lora.init_lora_weights=loftq", "needs a quantised base"),
    ("model.lora.init_lora_weights=eva", "a pass over the training data"),
    ("model.lora.init_lora_weights=kaiming", "must be true, false, gaussian or orthogonal"),
    ("model.lora.init_lora_weights=orthogonal", "needs an even model.lora.r (got 5)"),
])
def test_lora_config_mistakes_are_one_line(override, needle):
    rank = ["model.lora.r=5"] if "orthogonal" in override else []
    with pytest.raises(UserError) as e:
        load_config(harness.TINY, ["output_dir=/tmp/unused", *LORA, *rank, override])
    assert needle in e.value.message and "\n" not in e.value.message


def test_lora_target_the_model_lacks_is_a_user_error():
    with pytest.raises(UserError, match="model.lora: .*no_such_proj"):
        build([*LORA, "model.lora.target_modules=[no_such_proj]"], 0)


def test_missing_peft_names_the_extra(monkeypatch):
    from ds_finetune.lora import check_peft_installed

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(UserError, match=r"pip install 'ds-finetune\[lora\]'"):
        check_peft_installed()


def test_the_base_files_not_the_folder_are_a_lora_runs_identity(tmp_path, monkeypatch):
    from ds_finetune.lora import base_model_files

    monkeypatch.setenv("DS_FINETUNE_CACHE", str(tmp_path / "cache"))  # the hash memo

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    (base / "tokenizer.json").write_text("{}")  # the tokenizer is fingerprinted with the data, not here
    files = base_model_files(str(base))
    assert set(files) == {"config.json", "model.safetensors"}
    cfg = load_config(harness.TINY, ["output_dir=/tmp/unused", *LORA, "model.config=null",
                                     f"model.name_or_path={base}", "model.tokenizer=assets/tiny-tokenizer"])
    moved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": "/elsewhere"})})
    saved = config_fingerprint(cfg, 8, "data", files)
    assert changed_exact_keys(saved, config_fingerprint(moved, 8, "data", files)) == []
    (base / "model.safetensors").write_bytes(b"other weights")
    changed = base_model_files(str(base))
    assert changed_exact_keys(saved, config_fingerprint(cfg, 8, "data", changed)) == ["model.base_files.model.safetensors"]


def test_isolated_packing_accepts_a_lora_model():
    """The packing check reads the transformers model inside peft's wrapper (peft's own module builds no masks)."""
    from ds_finetune.model import check_isolated_packing

    check_isolated_packing(build(LORA, 0), micro_batch_size=2)


def test_dora_and_the_init_reach_peft_and_the_fingerprint_only_when_set():
    from ds_finetune.fingerprint import model_identity
    from ds_finetune.lora import hf_model
    dora = build([*LORA, "model.lora.use_dora=true", "model.lora.init_lora_weights=orthogonal"], 0)
    config = dora.peft_config["default"]
    assert config.use_dora and config.init_lora_weights == "orthogonal"
    magnitudes = [n for n, p in dora.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n]
    assert magnitudes and hf_model(dora) is dora.get_base_model()
    plain = load_config(harness.TINY, ["output_dir=/tmp/unused", *LORA]).model
    assert set(model_identity(plain, None)["lora"]) == {"r", "alpha", "dropout", "target_modules", "modules_to_save"}
    cfg = load_config(harness.TINY, ["output_dir=/tmp/unused", *LORA, "model.lora.use_dora=true"]).model
    assert model_identity(cfg, None)["lora"]["use_dora"] is True
