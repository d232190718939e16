"""The `model.lora` section of the run config (config.py): LoRA's rank, scale, targets, DoRA and peft's
adapter init, with the inits that cannot work here refused in one line."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from ds_finetune.config_text import Section

# peft's init_lora_weights choices that cannot work here, and why.
LORA_INITS_REFUSED = {
    "pissa": "it rewrites the base weights, which a checkpoint does not hold (the adapter would need converting "
             "to plain LoRA at every export)",
    "olora": "it rewrites the base weights, which a checkpoint does not hold",
    "corda": "it rewrites the base weights and needs a pass over data before training",
    "eva": "it needs a pass over the training data before training",
    "loftq": "it needs a quantised base and a LoftQ config",
    "mica": "it freezes B, which a checkpoint (trained parameters only) would then not hold",
}


def check_lora_init(value):
    if isinstance(value, bool) or value in ("gaussian", "orthogonal"):
        return value
    family = "pissa" if str(value).startswith("pissa_niter_") else value
    if family in LORA_INITS_REFUSED:
        raise ValueError(f"{value} is not supported: {LORA_INITS_REFUSED[family]}; use true, gaussian or orthogonal")
    raise ValueError(f"must be true, false, gaussian or orthogonal (got {value!r})")


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=65536, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear (every linear "
                                  "layer but the LM head).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. [lm_head]).")
    use_dora: bool = Field(False, description="DoRA: adapt each weight's direction with LoRA and train its "
                                              "magnitude (peft's use_dora).")
    init_lora_weights: Union[bool, str] = Field(
        True, description="peft's adapter init: true (B = 0), false (random; for tests), gaussian, orthogonal (even "
                          "r). pissa, olora, corda, eva, loftq and mica are refused (docs/config.md).")

    @field_validator("init_lora_weights")
    @classmethod
    def _init_we_can_run(cls, value):
        return check_lora_init(value)

    @model_validator(mode="after")
    def _orthogonal_rank(self):
        if self.init_lora_weights == "orthogonal" and self.r % 2:
            raise ValueError(f"init_lora_weights orthogonal needs an even model.lora.r (got {self.r})")
        return self

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("list at least one module name, or all-linear")
        return value
