"""QLoRA: `model.quantization: 4bit | 8bit` loads the frozen base through bitsandbytes and trains LoRA adapters
on it (model.lora is required). 4-bit is NF4 with double quantisation, computing in model.dtype and stored in
model.dtype, the storage transformers documents for ZeRO-3 (DeepSpeed partitions float tensors). 8-bit is
LLM.int8 (ZeRO 0-2). bitsandbytes >= 0.46 runs both on the CPU too (tested with 0.50 on this project's CPU
machines: forward, backward, ZeRO 2 and 3 on one rank).

The quantised weights are computed from the base's files at every load, the same on every rank and restart,
so a resumed run continues bitwise; an export with --merge merges the adapters into the unquantised base.
"""

from __future__ import annotations

from ds_finetune.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_installed() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("config error: model.quantization needs bitsandbytes, which is not installed; "
                        "pip install 'ds-finetune[qlora]' (or remove model.quantization)") from None


def quantization_config(model_cfg):
    """transformers' BitsAndBytesConfig for `model.quantization` (None when unset)."""
    if model_cfg.quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, DTYPES[model_cfg.dtype])
    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def prepare(model, quantized: bool):
    """peft's preparation of a quantised base for training adapters (norms and the head in fp32, the
    embeddings' output requiring grad); gradient checkpointing is ours (model.build_model), not redone here."""
    if not quantized:
        return model
    import peft
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
