"""LoRA fine-tuning through peft: wrap the model, identify its base, and export the trained adapters.

* `apply_lora` freezes the base and adds the adapters (`model.lora`); only they (and `modules_to_save`)
  are trainable, so only they reach the optimizer and the checkpoint (DeepSpeed's
  `exclude_frozen_parameters`): a checkpoint is the adapters, their Adam moments and what exact resume
  needs, not the base.
* Because the base is not in the checkpoint, it is part of the run's identity: `base_model_files` hashes
  its config and weight files (remembered by path, size and mtime, so a restart does not read them again)
  and the fingerprint refuses a resume on other files, naming them.
* `export_adapter` writes a PEFT adapter folder (`PeftModel.from_pretrained(base, OUT)` loads it) and
  `export_merged` a plain Hugging Face model with the adapters merged into the base. Parameter names are
  mapped to PEFT's file names by peft itself, on a skeleton of the model built on the meta device (no
  memory for the base).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ds_finetune.errors import UserError, first_line
from ds_finetune.hashing import hash_shared

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIGS = ("config.json", "generation_config.json")
BASE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # weights, shard indexes, config


def check_peft_installed() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("config error: model.lora needs peft, which is not installed; "
                        "pip install 'ds-finetune[lora]' (or pip install peft)") from None


def peft_config(lora_cfg, base_name: str | None, task_type: str = "CAUSAL_LM"):
    import peft

    return peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                           target_modules=lora_cfg.target_modules, modules_to_save=lora_cfg.modules_to_save or None,
                           use_dora=lora_cfg.use_dora, init_lora_weights=lora_cfg.init_lora_weights,
                           task_type=task_type, base_model_name_or_path=base_name)


def task_type(model) -> str:
    """PEFT's task of a transformers model: a sequence classifier (a reward model) is SEQ_CLS, for which
    peft trains its head (`score`) whole beside the adapters, as TRL's RewardTrainer asks."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def auto_model_class(config):
    """The transformers auto class of an adapter checkpoint's base, from its PEFT config's task type."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForSequenceClassification if config.task_type == "SEQ_CLS" else AutoModelForCausalLM


def apply_lora(model, lora_cfg, seed: int, base_name: str | None):
    """The model with the base frozen and adapters added. Seeded here, so the adapters start from the same
    values on every rank, ZeRO stage and world size, whatever loading the base drew from the RNG."""
    import peft

    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(model, peft_config(lora_cfg, base_name, task_type(model)))
    except ValueError as e:  # e.g. target modules the model does not have
        raise UserError(f"config error: model.lora: {first_line(e, 300)}") from None


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_model(model):
    """The transformers model inside (the chunked loss hooks its base model and calls its LM head)."""
    return model.get_base_model() if is_lora(model) else model


def base_folder(name_or_path: str, revision: str | None = None) -> Path:
    """The base model's local folder: itself, or its snapshot at `revision` (model.revision) in the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        raise UserError(f"model error: {name_or_path} is neither a folder nor in the Hugging Face cache "
                        f"({type(e).__name__}); download it first or point model.name_or_path at a folder") from None


def base_model_files(name_or_path: str, board=None, revision: str | None = None) -> dict[str, str]:
    """{file name: sha256} of the base model's config and weight files: a LoRA run's identity (remembered,
    and with a `rendezvous.Rendezvous` split between the ranks: `hashing.hash_shared`)."""
    folder = base_folder(name_or_path, revision)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in BASE_WEIGHT_SUFFIXES
                   and not p.name.startswith(("tokenizer", "special_tokens", "generation_config")))
    return hash_shared({name: folder / name for name in files}, board)


# ------------------------------------------------------------------------------------------------ export

def write_adapter_config(target: Path, model) -> None:
    """Rank 0, at every save: the adapter's config travels with the checkpoint (`step_N/hf/`)."""
    if is_lora(model):
        model.peft_config["default"].save_pretrained(target)


def is_adapter_checkpoint(hf_dir: Path) -> bool:
    return (hf_dir / ADAPTER_CONFIG).exists()


def adapter_state(hf_dir: Path, names: list[str], read, trust_remote_code: bool = False
                  ) -> tuple[object, dict[str, torch.Tensor]]:
    """(peft config, {PEFT file key: tensor}) of a checkpoint's trained parameters `names`."""
    import peft
    from transformers import AutoConfig

    config = peft.PeftConfig.from_pretrained(str(hf_dir))
    base_name = config.base_model_name_or_path
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    with torch.device("meta"):  # names only: no memory for the base
        skeleton = peft.get_peft_model(auto_model_class(config).from_config(
            AutoConfig.from_pretrained(hf_dir, **remote), **remote), config)
    config.base_model_name_or_path = base_name  # get_peft_model renames it after the skeleton's folder
    return config, peft.get_peft_model_state_dict(skeleton, state_dict={name: read(name) for name in names})


def export_adapter(hf_dir: Path, out_dir: Path, names: list[str], read, dtype: torch.dtype,
                   hub_options: dict | None = None) -> Path:
    """A PEFT adapter folder: adapter_config.json, adapter_model.safetensors and the tokenizer."""
    from safetensors.torch import save_file

    _, state = adapter_state(hf_dir, names, read, bool((hub_options or {}).get("trust_remote_code")))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    copy_hf_files(hf_dir, out_dir, skip=MODEL_CONFIGS)  # the folder is an adapter, not a model
    return out_dir


def export_merged(hf_dir: Path, out_dir: Path, names: list[str], read, dtype: torch.dtype, base_files: dict | None,
                  max_shard_size: int, hub_options: dict | None = None) -> Path:
    """The base with the adapters merged in, as a plain Hugging Face model (the base is loaded whole).
    `hub_options`: the run's model.revision and model.trust_remote_code, as the base was loaded in training."""
    import peft

    hub_options = hub_options or {}
    revision = hub_options.get("revision")
    config, state = adapter_state(hf_dir, names, read, bool(hub_options.get("trust_remote_code")))
    base_name = config.base_model_name_or_path
    if not base_name:
        raise UserError("export error: the run's base was a random init from model.config; --merge needs a saved "
                        "base model (export the adapter without --merge)")
    if base_files:
        check_same_base(base_name, base_files, revision)
    remote = {"trust_remote_code": True} if hub_options.get("trust_remote_code") else {}
    base = auto_model_class(config).from_pretrained(str(base_folder(base_name, revision)), dtype=torch.float32,
                                                    **_head_of(hf_dir, config), **remote)
    model = peft.get_peft_model(base, config)
    peft.set_peft_model_state_dict(model, state)
    merged = model.merge_and_unload().to(dtype)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    copy_hf_files(hf_dir, out_dir, skip=(ADAPTER_CONFIG, *MODEL_CONFIGS))  # save_pretrained wrote the configs
    return out_dir


def _head_of(hf_dir: Path, config) -> dict:
    """A classifier's label count and pad id, as the checkpoint's config holds them (the base, a causal LM
    folder, has neither)."""
    if config.task_type != "SEQ_CLS":
        return {}
    import json
    saved = json.loads((hf_dir / "config.json").read_text())
    return {"num_labels": saved.get("num_labels", len(saved.get("id2label") or {}) or 1),
            "pad_token_id": saved.get("pad_token_id")}


def copy_hf_files(hf_dir: Path, out_dir: Path, skip: tuple[str, ...]) -> None:
    """The checkpoint's `hf/` files (tokenizer, configs) into an export, less `skip`."""
    for f in sorted(hf_dir.iterdir()):
        if f.name not in skip:
            shutil.copy2(f, out_dir / f.name)


def check_same_base(base_name: str, saved: dict, revision: str | None = None) -> None:
    now = base_model_files(base_name, revision=revision)
    changed = sorted(name for name in set(saved) | set(now) if saved.get(name) != now.get(name))
    if changed:
        raise UserError(f"export error: the base model {base_name} is not the one the adapters were trained on "
                        f"(changed: {', '.join(changed)}); point it at the original base")
