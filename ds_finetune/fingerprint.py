"""The config fingerprint that resume compares: `exact` keys change the computed steps if changed (a resume
with a change is refused, naming them), `harmless` ones do not."""

from __future__ import annotations

from ds_finetune.config import RunConfig
from ds_finetune.data_config import SOURCE_FIELDS, SOURCE_FIELDS_ADDED, DataConfig
from ds_finetune.objectives import fingerprint_settings
from ds_finetune.zero_passthrough import fingerprint_parts


# The chunked loss's implementation (ds_finetune/loss.py, fused_head.py), in the fingerprint of chunked runs only: one
# that sums token losses or gradients in another order moves the weights at float-noise level, so a
# checkpoint saved by another is refused as a changed setting would be. A full-logits run
# (loss_chunk_tokens 0) records none and resumes across such changes. Checkpoints from before this key
# (chunks recomputed in backward) lack it, so they are refused too. v2 changed only a bf16/fp16 head's
# weight gradient (summed in fp32 by addmm on CUDA, no half product per chunk): fp32 runs keep v1, so their
# checkpoints still resume.
CHUNKED_LOSS_IMPLEMENTATION = {"fp32": "fused-linear-ce-v1", "bf16": "fused-linear-ce-v2", "fp16": "fused-linear-ce-v2"}


def config_fingerprint(cfg: RunConfig, global_batch: int, data_hash: str | dict,
                       base_files: dict | None = None) -> dict:
    """What resume compares. `exact` keys change the computed steps if changed; `harmless` ones do not.
    `data_hash`: the content hash of data.path, or {source name: its hash} of data.sources.
    `base_files` ({file: sha256} of a LoRA run's base model) is part of the identity: the checkpoint holds
    only the adapters, so the base must be the same files."""
    data = ({"data": data_fingerprint(cfg.data), "data.sources": sources_fingerprint(cfg.data, data_hash)}
            if cfg.data.is_mixture else {"data": {**data_fingerprint(cfg.data), "content_sha256": data_hash}})
    ds_exact, ds_harmless = fingerprint_parts(cfg.deepspeed)
    return {
        "exact": {
            "model": model_identity(cfg.model, base_files),
            **({"model.base_files": base_files} if base_files else {}),
            **data,
            "train.seed": cfg.train.seed,
            "train.global_batch": global_batch,
            "train.loss_chunk_tokens": cfg.train.loss_chunk_tokens,  # changes the summation order
            **({"train.loss_implementation": CHUNKED_LOSS_IMPLEMENTATION[cfg.model.dtype]}
               if cfg.train.loss_chunk_tokens else {}),
            # Tiles sum the MLP's weight gradients in another order; only when on, so older checkpoints match.
            **({"train.tiled_mlp": True} if cfg.train.tiled_mlp else {}),
            "eval.fraction": cfg.eval.fraction,  # which rows are trained on
            **fingerprint_settings(cfg),  # the objective's name and section (none for SFT)
            "train.optimizer": optimizer_settings(cfg.train),
            # Only when set, so checkpoints from before the key still match (zero_passthrough.py says which
            # keys change a step's arithmetic).
            **({"deepspeed": ds_exact} if ds_exact else {}),
        },
        "harmless": {
            "train.max_steps": cfg.train.max_steps,
            "train.epochs": cfg.train.epochs,
            "train.sequence_parallel": cfg.train.sequence_parallel,  # recorded; a resume says when it changed
            "checkpoint": cfg.checkpoint.model_dump(mode="json"),
            "eval": cfg.eval.model_dump(mode="json", exclude={"fraction"}),
            "logging": cfg.logging.model_dump(mode="json"),
            **({"deepspeed": ds_harmless} if ds_harmless else {}),
        },
    }


# Keys added after the first release, recorded only when not their default: checkpoints from before match.
OPTIMIZER_KEYS_ADDED = {"optimizer": "adamw", "warmup_ratio": 0.0, "lr_scheduler_kwargs": {}}


def optimizer_settings(t) -> dict:
    """The optimizer and schedule settings resume compares."""
    settings = {k: getattr(t, k) for k in ("lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
                                           "adam_beta1", "adam_beta2", "adam_eps", "grad_clip")}
    return {**settings, **{k: getattr(t, k) for k, default in OPTIMIZER_KEYS_ADDED.items() if getattr(t, k) != default}}


def model_identity(model, base_files: dict | None) -> dict:
    """The model section as the fingerprint records it. With base_files, the files are the base's identity,
    not the folder they lie in; the attention implementation only when set, so checkpoints from before the
    key still match."""
    excluded = {"name_or_path"} if base_files else set()
    if model.attn_implementation is None:
        excluded.add("attn_implementation")
    if model.revision is None:  # added later: only when set, as attn_implementation
        excluded.add("revision")
    if not model.trust_remote_code:
        excluded.add("trust_remote_code")
    if model.quantization is None:
        excluded.add("quantization")
    dumped = model.model_dump(mode="json", exclude=excluded or None)
    if model.lora is not None:  # keys added later, only when not their default (older LoRA checkpoints match)
        added = {"use_dora": False, "init_lora_weights": True}
        dumped["lora"] = {k: v for k, v in dumped["lora"].items() if k not in added or v != added[k]}
    return dumped


# How a checkpoint saved before packs were isolated recorded `data.packing` (a bool): the same
# computation must compare equal, a changed one must not.
_PACKING_AS_SAVED_BEFORE = {"none": False, "shared": True, "isolated": "isolated"}


def data_fingerprint(data: DataConfig) -> dict:
    """The data settings resume compares. `packing: shared` is what `packing: true` computed before
    packs were isolated, so it is recorded as `true` was; `isolated` is recorded as itself, so resuming a
    checkpoint of an old packed run with `packing: true` is refused (its losses change)."""
    fields = data.settings(exclude={"cache_dir", "path", "num_proc", "sources"})
    return {**fields, "packing": _PACKING_AS_SAVED_BEFORE.get(data.packing, data.packing)}


def sources_fingerprint(data: DataConfig, hashes: dict) -> dict:
    """A mixture's sources: `<name>` (what the source is: its content and format settings) and
    `<name>.weight`, so a resume with a changed mix names the source and what changed."""
    out = {}
    for name, weight, source in data.source_configs():
        added = {k: getattr(source, k) for k in SOURCE_FIELDS_ADDED if getattr(source, k) is not None}
        out[name] = {**{k: getattr(source, k) for k in SOURCE_FIELDS}, **added, "content_sha256": hashes[name]}
        out[f"{name}.weight"] = weight
    return out



def changed_exact_keys(saved: dict, current: dict) -> list[str]:
    """Keys of the `exact` fingerprint whose values differ (nested dicts are compared per sub-key)."""
    changed = []
    a, b = saved.get("exact", {}), current.get("exact", {})
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            changed += [f"{key}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        elif va != vb:
            changed.append(key)
    return changed
