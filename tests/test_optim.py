"""train.optimizer and train.lr_schedule: the choices, their one-line refusals, and that a one-rank engine
restored from a checkpoint continues with bitwise the schedule, optimizer state and weights of the
uninterrupted engine (in process; the multi-process kill/resume is in test_resume_combinations.py)."""
import gc
import math
import os
from pathlib import Path

import pytest
import torch

import harness
from conftest import process_group
from ds_finetune.checkpoint import ds_internals
from ds_finetune.config import load_config
from ds_finetune.errors import UserError
from ds_finetune import optim

# The tiny config sets warmup_steps 4 and min_lr_ratio 0.1, which are for ds-finetune's own schedules.
HF_BASE = ["train.warmup_steps=0", "train.min_lr_ratio=0"]


def assert_one_line(call, needle):
    with pytest.raises(UserError) as e:
        call()
    assert needle in e.value.message and "\n" not in e.value.message, e.value.message


def train_cfg(*overrides):
    return load_config(harness.TINY, ["output_dir=/tmp/unused", *overrides]).train


# ------------------------------------------------------------------------------------------ schedules

def test_own_cosine_keeps_its_numbers():
    """The formula of the first release (warmup from lr/warmup, cosine to min_lr_ratio), written out here."""
    f = optim.lr_factor(train_cfg("train.warmup_steps=2", "train.min_lr_ratio=0.1"), total_steps=10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(9) == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))
    assert optim.lr_factor(train_cfg("train.lr_schedule=constant", "train.warmup_steps=0"), 10)(7) == 1.0


def test_warmup_ratio_is_rounded_up_as_the_hf_trainer():
    t = train_cfg(*HF_BASE, "train.lr_schedule=cosine_with_min_lr", "train.warmup_ratio=0.25",
                  "train.lr_scheduler_kwargs.min_lr_rate=0.1")
    assert optim.warmup_steps(t, 10) == 3  # ceil(2.5)
    f = optim.lr_factor(t, 10)
    assert [f(0), f(1), f(3)] == [0.0, 1 / 3, 1.0]  # HF's warmup starts from 0
    assert f(10) == pytest.approx(0.1) and f(5) > f(8) > 0.1
    own = optim.lr_factor(train_cfg("train.warmup_steps=0", "train.warmup_ratio=0.25"), 10)
    assert [own(0), own(2), own(3)] == [1 / 3, 1.0, 1.0] and own(4) < 1.0  # 3 warmup steps, ours from lr/3


def test_warmup_stable_decay_takes_its_arguments():
    t = train_cfg(*HF_BASE, "train.lr_schedule=warmup_stable_decay", "train.warmup_ratio=0.2",
                  "train.lr_scheduler_kwargs.num_decay_steps=4", "train.lr_scheduler_kwargs.min_lr_ratio=0.25")
    f = optim.lr_factor(t, 20)
    assert f(4) == f(15) == 1.0  # stable between warmup (4 steps) and decay (the last 4)
    assert 0.25 < f(17) < 1.0 and f(20) == pytest.approx(0.25)


@pytest.mark.parametrize("overrides, needle", [
    (["train.lr_schedule=reduce_lr_on_plateau"], "steps on a measured loss"),
    (["train.lr_schedule=greedy"], "steps on a measured loss"),
    (["train.lr_schedule=warmup_stable_decay"], "needs train.lr_scheduler_kwargs.num_decay_steps"),
    (["train.lr_schedule=cosine_with_min_lr"], "One of min_lr or min_lr_rate"),
    (["train.lr_schedule=cosine_with_min_lr", "train.lr_scheduler_kwargs.min_lr_ratez=0.1"],
     "takes no min_lr_ratez (it takes: num_cycles, min_lr, min_lr_rate)"),
    (["train.lr_schedule=polynomial", "train.lr_scheduler_kwargs.lr_end=1"], "must be smaller than initial lr"),
    (["train.warmup_ratio=0.1", "train.warmup_steps=2"], "not both"),
    (["train.lr_schedule=cosine", "train.lr_scheduler_kwargs.num_cycles=2"], "takes train.min_lr_ratio"),
    (["train.lr_schedule=polynomial", "train.min_lr_ratio=0.1"], "min_lr_ratio (0.1) is for cosine/linear"),
    (["train.optimizer=adafactor"], "adafactor needs train.zero_stage 0"),
    (["train.optimizer=sgd"], "train.optimizer"),
])
def test_schedule_and_optimizer_mistakes_are_one_line(overrides, needle):
    assert_one_line(lambda: load_config(harness.TINY, ["output_dir=/tmp/unused", *HF_BASE, *overrides]), needle)


def test_a_schedule_transformers_refuses_at_build_time_is_a_user_error():
    """What the config check cannot see (it builds with a stand-in step count) is refused in training too."""
    t = train_cfg(*HF_BASE).model_copy(update={"lr_schedule": "polynomial", "lr_scheduler_kwargs": {"lr_end": 1.0}})
    with pytest.raises(UserError, match="lr_end .1.0. must be smaller than initial lr"):
        optim.lr_factor(t, 10)


# ------------------------------------------------------------------------------------------ optimizers

def test_lion_is_the_published_update():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = optim.build_optimizer([{"params": [p], "weight_decay": 0.1}], train_cfg("train.optimizer=lion", "train.lr=0.01",
                                "train.adam_beta1=0.9", "train.adam_beta2=0.99"), offloaded=False, on_gpu=False)
    g1, g2 = torch.tensor([0.3, 0.2, -0.1]), torch.tensor([-1.0, 0.05, -0.1])
    w, m = p.detach().clone(), torch.zeros(3)
    for g in (g1, g2):  # Chen et al. 2023, Algorithm 2 (decoupled weight decay)
        w = w * (1 - 0.01 * 0.1) - 0.01 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-7)


def test_the_optimizer_classes_on_this_cpu():
    p = [torch.nn.Parameter(torch.ones(4, 4))]
    kinds = {}
    for name in ("adamw", "adamw_fused", "lion", "adafactor"):
        opt = optim.build_optimizer([{"params": p, "weight_decay": 0.0}], train_cfg(f"train.optimizer={name}",
                                    "train.zero_stage=0"), offloaded=False, on_gpu=False)
        kinds[name] = (type(opt).__name__, opt.defaults.get("fused"))
    assert kinds == {"adamw": ("AdamW", None), "adamw_fused": ("AdamW", True), "lion": ("Lion", None),
                     "adafactor": ("Adafactor", None)}


@pytest.mark.parametrize("stage", [0, 2])
def test_adamw_fused_on_a_gpu_is_deepspeeds_fused_adam_except_at_zero_0(monkeypatch, stage):
    """At ZeRO 0 in bf16/fp16 DeepSpeed would put its FusedAdam under its fused FP16_Optimizer, which keeps the
    fp32 masters as one flat tensor a group (`fp32_groups_flat`): conversion and export read them per
    parameter (`fp32_groups`, the unfused wrapper's, which torch's fused AdamW gets)."""
    import deepspeed.ops.adam

    class FusedAdam:  # DeepSpeed's needs its CUDA op built
        def __init__(self, groups, **kwargs):
            self.defaults = {"fused": "deepspeed"}

    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", FusedAdam)
    p = [torch.nn.Parameter(torch.ones(4, 4))]
    opt = optim.build_optimizer([{"params": p, "weight_decay": 0.0}], train_cfg(
        "train.optimizer=adamw_fused", f"train.zero_stage={stage}"), offloaded=False, on_gpu=True)
    want = ("AdamW", True) if stage == 0 else ("FusedAdam", "deepspeed")
    assert (type(opt).__name__, opt.defaults["fused"]) == want


def test_adamw_8bit_without_bitsandbytes_names_the_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    assert_one_line(lambda: optim.check_installed("adamw_8bit"), "pip install 'ds-finetune[qlora]'")


def test_another_optimizers_checkpoint_is_refused_even_when_changes_are_allowed():
    from ds_finetune.fingerprint import config_fingerprint
    adamw = config_fingerprint(load_config(harness.TINY, ["output_dir=/tmp/unused"]), 8, "sha")
    lion = config_fingerprint(load_config(harness.TINY, ["output_dir=/tmp/unused", "train.optimizer=lion"]), 8, "sha")
    optim.check_same_optimizer(adamw, adamw, "ckpt")
    optim.check_same_optimizer({}, adamw, "ckpt")  # a checkpoint from before the key: adamw
    fused = config_fingerprint(load_config(harness.TINY, ["output_dir=/tmp/unused", "train.optimizer=adamw_fused"]),
                               8, "sha")
    optim.check_same_optimizer(adamw, fused, "ckpt")
    assert_one_line(lambda: optim.check_same_optimizer(adamw, lion, "ckpt"),
                    "holds the state of train.optimizer adamw, not lion")


def test_converting_a_non_adam_checkpoint_is_refused():
    optim.check_convertible("adamw_fused")
    assert_one_line(lambda: optim.check_convertible("lion"), "resumes only on its own ZeRO stage")


# ------------------------------------------------------------------------------- restore is bitwise

@pytest.fixture(scope="module")
def engine_group(tmp_path_factory):
    """One gloo group for the engines of this module (made again if a worker runs another module's tests in
    between): DeepSpeed derives groups from it, which must outlive every engine built on them."""
    with process_group(tmp_path_factory.mktemp("engine-group") / "store"):
        yield


def one_rank_engine(overrides, seed: int):
    from ds_finetune import ds_internals
    from ds_finetune.model import build_engine, build_model
    from ds_finetune.zero import zero_config_for_run

    ds_internals.skip_cpu_inference_all_reduce()
    ds_internals.skip_muon_import()
    cfg = load_config(harness.TINY, ["output_dir=/tmp/unused", "train.grad_accum=1", "train.micro_batch_size=2",
                                     "model.config.attention_dropout=0.0", *overrides])
    ds = zero_config_for_run(cfg, 1)
    torch.manual_seed(seed)
    return build_engine(build_model(cfg, ds), cfg, ds, total_steps=8)


def train_steps(engine, steps: range) -> list[tuple[float, float]]:
    """(lr, loss) of each step; the batch and dropout of step s are drawn from s alone (the RNG's restore is
    checkpoint/'s, tested by the kill tests)."""
    out = []
    for s in steps:
        x = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(s))
        torch.manual_seed(1000 + s)
        lr = engine.get_lr()[0]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        out.append((lr, loss.item()))
    return out


def assert_same_state(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers, equal bitwise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def fp32_weights(engine) -> dict:
    """The fp32 weights the optimizer updates (ZeRO 1-3: its partitions gathered; ZeRO 0: the module's)."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    return {n: (w if w is not None else p).detach().clone()
            for (n, w), p in zip(full.items(), engine.module.parameters())}


CASES = {
    "lion-warmup_stable_decay-zero1": ["train.zero_stage=1", "train.optimizer=lion", *HF_BASE,
                                       "train.lr_schedule=warmup_stable_decay", "train.warmup_ratio=0.25",
                                       "train.lr_scheduler_kwargs.num_decay_steps=3"],
    "adafactor-cosine_with_min_lr-zero0": ["train.zero_stage=0", "train.optimizer=adafactor", *HF_BASE,
                                           "train.lr_schedule=cosine_with_min_lr", "train.warmup_ratio=0.25",
                                           "train.lr_scheduler_kwargs.min_lr_rate=0.1"],
    "adamw_fused-polynomial-zero2": ["train.zero_stage=2", "train.optimizer=adamw_fused", *HF_BASE,
                                     "train.lr_schedule=polynomial", "train.warmup_steps=2",
                                     "train.lr_scheduler_kwargs.power=2.0", "train.lr_scheduler_kwargs.lr_end=1.0e-5"],
    "adamw_8bit-inverse_sqrt-zero2": ["train.zero_stage=2", "train.optimizer=adamw_8bit", *HF_BASE,
                                      "train.lr_schedule=inverse_sqrt", "train.warmup_steps=2"],
    # DoRA's magnitudes are trained parameters; ZeRO 3 gathers the base weight its norm needs
    "dora-gaussian-init-zero3": ["train.zero_stage=3", "model.lora.r=4", "model.lora.alpha=8",
                                 "model.lora.use_dora=true", "model.lora.init_lora_weights=gaussian"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_restored_engine_continues_bitwise(engine_group, tmp_path, monkeypatch, case):
    if "8bit" in case:
        pytest.importorskip("bitsandbytes", reason="adamw_8bit needs bitsandbytes (not a dependency)")
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # what a launcher sets
        monkeypatch.setenv(key, value)
    overrides = CASES[case]
    whole = one_rank_engine(overrides, seed=0)
    ref = train_steps(whole, range(6))

    first = one_rank_engine(overrides, seed=0)
    assert train_steps(first, range(3)) == ref[:3]
    first.save_checkpoint(str(tmp_path), tag="step3")
    resumed = one_rank_engine(overrides, seed=99)  # other weights until the load
    ds_internals.route_checkpoint_reads(resumed)  # memory-mapped, as a resume loads
    resumed.load_checkpoint(str(tmp_path), tag="step3", load_optimizer_states=True, load_lr_scheduler_states=True)
    assert resumed.lr_scheduler.last_epoch == 3  # the load happened: a fresh schedule is at 0
    gc.collect()
    held = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    assert not held, held  # nothing the engine keeps (the moments above all) still lives in a file's mapping
    assert train_steps(resumed, range(3, 6)) == ref[3:]
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()
    a, b = fp32_weights(whole), fp32_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    key = next(k for k in ("base_optimizer_state", "optimizer_state_dict", "state") if k in sa)  # ZeRO 1-2, 3, 0
    assert_same_state(sa[key], sb[key])
    assert len({lr for lr, _ in ref}) > 2  # the schedule moved


@pytest.mark.parametrize("to_device", [False, True])
def test_a_load_maps_only_what_deepspeed_or_the_device_copy_reads(tmp_path, to_device):
    """`load_for_engine` of a ZeRO-1/2 optimizer file: the fp32 partitions stay in the file's mapping
    (DeepSpeed copies them into its own), and so do the Adam moments where the optimizer's state lives on an
    accelerator (torch's load_state_dict copies them to the device: no host copy first); `step`, which torch
    keeps where it was loaded, and everything else get memory of their own."""
    path = tmp_path / "optim_states.pt"
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.randn(4096), "exp_avg_sq": torch.rand(4096)}
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {"state": {0: moments},
                                                                  "param_groups": [{"params": [0], "lr": 0.1}]},
                                         "single_partition_of_fp32_groups": [torch.randn(4096)]},
                "lr_scheduler": {"base_lrs": [0.1], "scale": torch.ones(8)}}, path)
    want = torch.load(path)
    got = ds_internals.load_for_engine(path, "cpu", optimizer_state_to_device=to_device)
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]

    def mapped(t):
        return any(a <= t.data_ptr() < b for a, b in ranges)
    osd = got["optimizer_state_dict"]
    state = osd["base_optimizer_state"]["state"][0]
    assert ranges and mapped(osd["single_partition_of_fp32_groups"][0])
    assert mapped(state["exp_avg"]) == mapped(state["exp_avg_sq"]) == to_device
    assert not mapped(state["step"]) and not mapped(got["lr_scheduler"]["scale"])
    for name, value in want["optimizer_state_dict"]["base_optimizer_state"]["state"][0].items():
        assert torch.equal(state[name], value), name


def test_the_optimizer_state_goes_to_the_device_only_where_its_parameters_are():
    from types import SimpleNamespace
    on = {"cpu": torch.zeros(2), "meta": torch.zeros(2, device="meta")}
    for device, want in (("cpu", False), ("meta", True)):  # meta: a device that is not the host
        torch_optimizer = torch.optim.SGD([on[device]], lr=0.1)
        assert ds_internals.optimizer_state_on_device(SimpleNamespace(optimizer=torch_optimizer)) is want
        zero = SimpleNamespace(optimizer=torch_optimizer)  # ZeRO's and bf16's optimizers wrap torch's
        assert ds_internals.optimizer_state_on_device(SimpleNamespace(optimizer=zero)) is want
        # ZeRO-3 between steps: the torch optimizer's param_groups are empty, its fp32 partitions are not
        idle = torch.optim.SGD([on[device]], lr=0.1)
        idle.param_groups[0]["params"] = []
        zero3 = SimpleNamespace(optimizer=idle, fp32_partitioned_groups_flat=[on[device]])
        assert ds_internals.optimizer_state_on_device(SimpleNamespace(optimizer=zero3)) is want
    assert ds_internals.optimizer_state_on_device(SimpleNamespace(optimizer=None)) is False


def test_the_fingerprint_records_the_new_keys_only_when_set():
    from ds_finetune.fingerprint import optimizer_settings
    assert set(optimizer_settings(train_cfg())) == {"lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
                                                    "adam_beta1", "adam_beta2", "adam_eps", "grad_clip"}  # as before
    changed = optimizer_settings(train_cfg(*HF_BASE, "train.optimizer=lion", "train.warmup_ratio=0.1",
                                           "train.lr_schedule=cosine_with_min_lr",
                                           "train.lr_scheduler_kwargs.min_lr_rate=0.1"))
    assert changed["optimizer"] == "lion" and changed["warmup_ratio"] == 0.1
    assert changed["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    return harness.save_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=7)


@pytest.mark.parametrize("bits, stage", [("4bit", 2), ("4bit", 3), ("8bit", 1)])
def test_qlora_trains_on_this_cpu_and_a_restore_continues_bitwise(engine_group, saved_base, tmp_path, monkeypatch,
                                                                  bits, stage):
    """bitsandbytes' CPU backend (>= 0.46) runs the quantised base here: the base's linear layers are
    bitsandbytes', only the adapters train, and a restored engine continues bitwise."""
    pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (not a dependency)")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    overrides = ["model.config=null", f"model.name_or_path={saved_base}", "model.lora.r=4", "model.lora.alpha=8",
                 f"model.quantization={bits}", f"train.zero_stage={stage}"]
    whole = one_rank_engine(overrides, seed=0)
    layer = type(whole.module.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__
    assert layer == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    assert all(".lora_" in n for n, p in whole.module.named_parameters() if p.requires_grad)
    ref = train_steps(whole, range(4))
    assert ref[-1][1] < ref[0][1]
    first = one_rank_engine(overrides, seed=0)
    assert train_steps(first, range(2)) == ref[:2]
    first.save_checkpoint(str(tmp_path), tag="step2", exclude_frozen_parameters=True)  # as checkpoint/ saves LoRA
    resumed = one_rank_engine(overrides, seed=99)
    resumed.load_checkpoint(str(tmp_path), tag="step2", load_module_strict=False, load_optimizer_states=True,
                            load_lr_scheduler_states=True)
    assert resumed.lr_scheduler.last_epoch == 2
    assert train_steps(resumed, range(2, 4)) == ref[2:]


@pytest.mark.parametrize("overrides, needle", [
    (["model.quantization=4bit"], "set model.lora"),
    (["model.quantization=4bit", "model.lora.r=4"], "set model.name_or_path, not model.config"),
    (["model.config=null", "model.name_or_path=org/model", "model.tokenizer=null", "model.lora.r=4",
      "model.quantization=8bit", "train.zero_stage=3"], "8bit is not supported with train.zero_stage 3"),
])
def test_qlora_mistakes_are_one_line(overrides, needle):
    assert_one_line(lambda: load_config(harness.TINY, ["output_dir=/tmp/unused", *overrides]), needle)


def test_qlora_without_bitsandbytes_names_the_package(monkeypatch):
    import sys

    from ds_finetune import quantization
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert_one_line(quantization.check_installed, "pip install 'ds-finetune[qlora]'")


# ------------------------------------------------------------------------------ the logged step metrics

def one_step(engine, grad_norm) -> None:
    x = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(7))
    engine.backward(engine(input_ids=x, labels=x).loss)
    grad_norm.before_update()
    engine.step()


def test_grad_norm_is_deepspeeds_and_zero0_computes_the_same(engine_group, monkeypatch):
    """ZeRO 1: the loop's all-reduce carries DeepSpeed's get_global_grad_norm() exactly. ZeRO 0 (fp32), where
    DeepSpeed keeps none, ours is the same norm of the same gradients (same init, same batch)."""
    from ds_finetune.grad_norm import GradNorm
    from ds_finetune.objectives import StepResult
    from ds_finetune.train import agree_on_step
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    zero1 = one_rank_engine(["train.zero_stage=1", "train.grad_clip=0.5"], seed=0)
    one_step(zero1, norm1 := GradNorm(zero1))
    deepspeed_norm = zero1.get_global_grad_norm()
    assert deepspeed_norm is not None and float(deepspeed_norm) > 0.5  # before clipping
    outcome = agree_on_step(StepResult(torch.zeros((), dtype=torch.float64), 1), 0, False, False, norm1.value())
    assert outcome.metrics["grad_norm"] == float(deepspeed_norm)

    zero0 = one_rank_engine(["train.zero_stage=0", "train.grad_clip=0.5"], seed=0)
    one_step(zero0, norm0 := GradNorm(zero0))
    assert zero0.get_global_grad_norm() is None  # why ZeRO 0 computes its own
    assert float(norm0.value()) == pytest.approx(float(deepspeed_norm), rel=1e-6)


def test_zero0_on_one_rank_skips_the_gradient_all_reduce_and_keeps_its_bits(engine_group, monkeypatch):
    """ZeRO 0 on one rank runs no all-reduce (no flat copy of every gradient: ds_internals.
    skip_single_rank_allreduce), and two steps give the bits of the engine that runs it; ZeRO 1 keeps it."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    skipped, reduced = (one_rank_engine(["train.zero_stage=0"], seed=0) for _ in range(2))
    assert not skipped.enable_backward_allreduce
    assert one_rank_engine(["train.zero_stage=1"], seed=0).enable_backward_allreduce
    reduced.enable_backward_allreduce = True
    calls, original = [], type(reduced).allreduce_gradients

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(type(reduced), "allreduce_gradients", counted)
    assert train_steps(skipped, range(2)) == train_steps(reduced, range(2))
    assert calls and all(c is reduced for c in calls)
    assert_same_state(fp32_weights(skipped), fp32_weights(reduced))


@pytest.mark.parametrize("chunk", [3, 64])
def test_token_accuracy_counts_top1_targets_in_the_chunked_and_full_losses(chunk):
    from types import SimpleNamespace

    from ds_finetune.fused_head import fused_linear_cross_entropy
    from ds_finetune.loss import full_loss_sum
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(20, 8, generator=g)
    logits = hidden @ weight.t()
    targets = torch.randint(0, 20, (10,), generator=g)
    targets[:4] = logits[:4].argmax(-1)  # at least 4 right
    expected = int((logits.argmax(-1) == targets).sum())
    correct = torch.zeros((), dtype=torch.float64)
    loss = fused_linear_cross_entropy(hidden, weight, None, targets, chunk, correct=correct)
    assert int(correct) == expected >= 4
    assert torch.equal(loss, fused_linear_cross_entropy(hidden, weight, None, targets, chunk))  # loss unchanged

    labels = torch.cat([torch.tensor([-100]), targets, torch.tensor([-100])])[None]  # position t's target: t + 1
    full_logits = torch.cat([logits, torch.zeros(2, 20)])[None]
    engine = lambda **inputs: SimpleNamespace(logits=full_logits)  # noqa: E731
    correct_full = torch.zeros((), dtype=torch.float64)
    full_loss_sum(engine, torch.zeros((1, 12), dtype=torch.long), torch.ones((1, 12)), labels, correct=correct_full)
    assert int(correct_full) == expected
