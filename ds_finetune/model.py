"""The model, its optimizer groups, the LR schedule and the DeepSpeed engine.

The model is built from `seed` identically on every rank, stage and world size; the optimizer (optim.py:
train.optimizer over two groups, decayed matrices and undecayed biases and norms) and a `LambdaLR` of the
train.lr_schedule are handed to `deepspeed.initialize`, which saves and loads them with the engine.
"""

from __future__ import annotations

import inspect
import sys

import torch

from ds_finetune import optim, quantization
from ds_finetune.dist import on_cuda

from ds_finetune.config import RunConfig
from ds_finetune.errors import UserError
from ds_finetune.lora import apply_lora, hf_model
from ds_finetune.objective_config import model_head
from ds_finetune.tiled_mlp import apply_tiled_mlp
from ds_finetune.zero_passthrough import offloads_optimizer


def auto_class(cfg: RunConfig):
    """(transformers' Auto class of the objective's head, its from_pretrained/from_config keyword arguments):
    a causal LM, or for the reward model a sequence classifier with one label (its `score` head drawn by
    transformers' init, from the seed like every weight), refused in one line where transformers has none
    for the model's type."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if model_head(cfg) == "causal_lm":
        return AutoModelForCausalLM, {}
    check_sequence_classification(cfg)
    return AutoModelForSequenceClassification, {"num_labels": 1}


def check_sequence_classification(cfg: RunConfig) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as HEADS
    if cfg.model.config is not None:
        model_type = cfg.model.config["model_type"]
    else:
        try:
            model_type = AutoConfig.from_pretrained(cfg.model.name_or_path, **cfg.model.hub_options()).model_type
        except Exception:  # noqa: BLE001 - the model's own load says what is wrong with it
            return
    if model_type not in HEADS:
        raise UserError(f"model error: train.objective reward trains a sequence classifier and transformers' "
                        f"AutoModelForSequenceClassification has none for model type {model_type!r} "
                        f"({cfg.model.name_or_path or 'model.config'}); pick a model whose type has one (llama, "
                        f"qwen2, mistral, gemma, ...)")


def build_model(cfg: RunConfig, ds_config: dict):
    from huggingface_hub.errors import StrictDataclassError

    keep_alive = None
    if cfg.train.zero_stage == 3 and cfg.model.name_or_path is not None:
        # Lets transformers load pretrained weights inside deepspeed.zero.Init, so no rank ever holds the
        # full model (what an 8B ZeRO-3 run needs). Must stay referenced while the model is built.
        # Not for an inline random-init config: zero.Init draws the random init in another order, and
        # the same seed must give the same weights at every stage (exact resume across stages).
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    # transformers' default attention unless the config names one
    attention = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    auto, head = auto_class(cfg)
    try:
        if cfg.model.config is not None:
            config = inline_model_config(cfg.model)
            for key, value in head.items():  # config attributes (from_pretrained takes them as overrides)
                setattr(config, key, value)
            model = auto.from_config(config, dtype=torch.float32)
        else:
            quantized = quantization.quantization_config(cfg.model)
            model = auto.from_pretrained(cfg.model.name_or_path, dtype=torch.float32, **attention, **head,
                                         **cfg.model.hub_options(),
                                         **({"quantization_config": quantized} if quantized else {}))
    except (OSError, ValueError, KeyError, TypeError, ImportError,  # ImportError: flash-attn not installed
            StrictDataclassError) as e:  # a config.json that transformers' validators refuse
        source = cfg.model.name_or_path or "model.config"
        if "trust_remote_code" in str(e):
            raise UserError(remote_code_message(source))
        raise UserError(f"model error: cannot build the model from {source} ({one_line_reason(e)})")
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.train.tiled_mlp:
        apply_tiled_mlp(model)
    del keep_alive
    if cfg.model.lora is not None:
        model = quantization.prepare(model, cfg.model.quantization is not None)
        model = apply_lora(model, cfg.model.lora, cfg.train.seed, cfg.model.name_or_path)
    model.train()  # from_pretrained returns the model in eval mode: dropout would silently be off
    return model


def inline_model_config(model):
    """The transformers config of `model.config` (`model`: the run config's model section), or a one-line
    UserError: transformers validates configs strictly (huggingface_hub's dataclass validators, e.g. a
    hidden_size that the heads do not divide), and its error spans several lines. The CLI calls this before
    anything launches, so the ranks never meet the error."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    inline = {**model.config, **({"attn_implementation": model.attn_implementation}
                                  if model.attn_implementation else {})}
    try:
        return AutoConfig.for_model(inline.pop("model_type"), **inline)
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"config error: model.config is not a config transformers accepts ({one_line_reason(e)}); "
                        f"fix model.config") from None


def remote_code_message(source: str) -> str:
    return (f"model error: {source} needs the modeling code it ships on the Hub; set model.trust_remote_code: true "
            f"if you trust that code")


def one_line_reason(err: BaseException, limit: int = 300) -> str:
    """An error of transformers' config validation on one line (its message puts the reason on the next)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_isolated_packing(model, micro_batch_size: int) -> None:
    """`data.packing: isolated` relies on transformers building a block-diagonal mask from position ids.
    Refuse, before training, the models that would silently let packed rows attend to each other:
    modeling code that does not build its masks with transformers' masking_utils (remote code, state-space
    models), and flash attention with more than one sequence a micro-batch (its kernels read pack
    boundaries from the positions only for a batch of one: `_is_packed_sequence`)."""
    model = hf_model(model)  # under LoRA, the transformers model inside peft's wrapper
    impl = str(getattr(model.config, "_attn_implementation", None) or "")
    module = sys.modules.get(type(model.base_model).__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    fix = "set data.packing: shared (rows attend to each other) or none"
    if "masking_utils import" not in source:
        raise UserError(f"config error: data.packing: isolated: {type(model).__name__} does not build its attention "
                        f"masks with transformers' masking_utils, so packed rows cannot be kept apart; {fix}")
    if "flash" in impl and micro_batch_size > 1:
        raise UserError(f"config error: data.packing: isolated with {impl} keeps packed rows apart only with "
                        f"train.micro_batch_size=1 (got {micro_batch_size}); set it to 1, use sdpa, or {fix}")


def param_group_names(model) -> list[list[str]]:
    """Trainable parameter names of the two optimizer groups: decayed (matrices), not decayed (biases,
    norms). Saved with each checkpoint so a ZeRO-0 optimizer state can be mapped back to names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 or len(getattr(p, "ds_shape", ())) >= 2 else no_decay).append(name)
    return [decay, no_decay]


def build_engine(model, cfg: RunConfig, ds_config: dict, total_steps: int, mpu=None):
    """`mpu`: the sequence-parallel groups of a run with train.sequence_parallel > 1 (`sequence.attach`)."""
    import deepspeed

    from ds_finetune.ds_internals import skip_single_rank_allreduce

    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in param_group_names(model))
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # From the DeepSpeed config: the `deepspeed:` mapping may offload (to NVMe) where train.offload_optimizer does not.
    optimizer = optim.build_optimizer(groups, t, offloaded=offloads_optimizer(ds_config) and on_cuda(),
                                      on_gpu=on_cuda())
    schedule = optim.lr_factor(t, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
        # A callable, so the scheduler drives the optimizer DeepSpeed wraps; DeepSpeed saves and loads it.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    skip_single_rank_allreduce(engine)
    return engine
