"""The GPU smoke check: what only a CUDA machine can show, in a few minutes on the tiny model.

    .venv/bin/python bench/gpu_check.py [--gpus N]      # default: every visible GPU (at most 2)

On CUDA + NCCL, bf16, deterministic kernels: a run with evaluation and background saves; a copy killed with
SIGKILL in the middle of a step and resumed (its losses must be bitwise those of the uninterrupted run); the
same save resumed under ZeRO 3 (converted; losses within the CPU test's tolerance); an fp16 run (loss scaling
with the fused loss); DeepSpeed's fused Adam and Lion, its CPU Lion and a 4-bit QLoRA base; adamw_fused
checkpoints converted from ZeRO 0 to 2 and from 2 to 3; an export loaded by transformers on the GPU;
background saves copied from the saved tensors' own GPU, on one stream, into one reused pinned buffer (the
bytes, and the pinned memory after 3 saves); the host syncs of a micro-step of the fused loss and
of DPO (none of ours); the bf16 LM head's weight gradient against fp32. Prints one line per check and a JSON
summary; exits non-zero if a check fails. Run it where a GPU is lent (docs/development.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import harness  # noqa: E402
from test_bf16 import BF16_CONVERTED_REL  # noqa: E402

WORK = harness.ROOT / "build" / "gpu-check"
GPU = {"DS_ACCELERATOR": "cuda"}  # harness.child_env forces the CPU otherwise
COMMON = ["model.dtype=bf16", "train.zero_stage=2", "train.max_steps=6", "eval.fraction=0.05", "eval.every_steps=3",
          "checkpoint.async_save=true"]


def train(out: Path, overrides, nproc: int, **kw):
    return harness.train(out, [*COMMON, *overrides], nproc=nproc, env={**GPU, **kw.pop("env", {})}, **kw)


def check_resume(nproc: int) -> dict:
    ref, killed = WORK / "ref", WORK / "killed"
    train(ref, [], nproc)
    proc = train(killed, [], nproc, fault="mid_accum:rank0@step4", expect_ok=False)
    assert "[fault injection] SIGKILL at mid_accum rank 0 step 4" in proc.stdout, proc.stdout[-3000:]
    converted = shutil.copytree(killed, WORK / "to-zero3")
    saved = harness.committed_steps(killed / "checkpoints")  # async saves: the newest commit may lag a step
    step = saved[-1] if saved else None
    harness.assert_resumed(train(killed, [], nproc, resume="auto"), step=step)
    harness.assert_same_run(killed, ref)
    harness.assert_resumed(train(converted, ["train.zero_stage=3"], nproc, resume="auto"), step=step)
    harness.assert_close_run(converted, ref, rel=BF16_CONVERTED_REL)  # as the CPU test: bf16 weights, fp32 masters
    rows = harness.metrics(ref)
    return {"losses": [r["loss"] for r in rows], "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r]}


def check_fp16(nproc: int) -> dict:
    out = WORK / "fp16"
    train(out, ["model.dtype=fp16"], nproc)
    losses = [r["loss"] for r in harness.metrics(out)]
    assert all(loss == loss and loss < 1e3 for loss in losses), losses  # finite: the scaler found its level
    return {"losses": losses}


def check_optimizers(nproc: int) -> dict:
    """What only CUDA runs of train.optimizer and model.quantization build and use: DeepSpeed's FusedAdam and
    FusedLion (JIT-built CUDA ops), its CPU Lion under optimizer offload, and a 4-bit QLoRA base on the GPU
    (when bitsandbytes is installed). Each trains 3 steps to finite losses."""
    runs = {"adamw_fused": ["train.optimizer=adamw_fused"], "lion": ["train.optimizer=lion", "train.lr=3.0e-4"],
            "lion-offload": ["train.optimizer=lion", "train.lr=3.0e-4", "train.offload_optimizer=cpu"]}
    try:
        import bitsandbytes  # noqa: F401
        base = harness.save_tiny_model(WORK / "qlora-base", seed=7)
        runs["qlora-4bit"] = ["model.config=null", f"model.name_or_path={base}", "model.lora.r=8",
                              "model.quantization=4bit"]
    except ImportError:
        pass
    out = {}
    for name, overrides in runs.items():
        train(WORK / f"optim-{name}", [*overrides, "train.max_steps=3"], nproc)
        losses = [r["loss"] for r in harness.metrics(WORK / f"optim-{name}")]
        assert len(losses) == 3 and all(loss == loss and loss < 1e3 for loss in losses), (name, losses)
        out[name] = losses
    return out


def check_fused_adam_conversions(nproc: int) -> dict:
    """train.optimizer adamw_fused killed mid-step and resumed on another ZeRO stage (converted): from ZeRO 0
    (torch's fused AdamW, so DeepSpeed keeps bf16's fp32 masters per parameter, which the conversion reads)
    to 2, and from ZeRO 2 (DeepSpeed's FusedAdam, whose step count the conversion sets as an int) to 3. Each
    resumes at its last commit and stays within the CPU test's tolerance of its uninterrupted run."""
    out = {}
    for saved, resumed in ((0, 2), (2, 3)):
        ref, killed = WORK / f"fused-ref-zero{saved}", WORK / f"fused-zero{saved}-to-zero{resumed}"
        train(ref, ["train.optimizer=adamw_fused", f"train.zero_stage={saved}"], nproc)
        proc = train(killed, ["train.optimizer=adamw_fused", f"train.zero_stage={saved}"], nproc,
                     fault="mid_accum:rank0@step4", expect_ok=False)
        assert "[fault injection] SIGKILL at mid_accum rank 0 step 4" in proc.stdout, proc.stdout[-3000:]
        step = harness.committed_steps(killed / "checkpoints")[-1]
        harness.assert_resumed(train(killed, ["train.optimizer=adamw_fused", f"train.zero_stage={resumed}"], nproc,
                                     resume="auto"), step=step)
        harness.assert_close_run(killed, ref, rel=BF16_CONVERTED_REL)
        out[f"zero{saved}_to_zero{resumed}"] = {"resumed_at": step}
    return out


def check_export() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ds_finetune.checkpoint.export import export_checkpoint
    from ds_finetune.checkpoint.verify import find_resumable_checkpoint

    info, _ = find_resumable_checkpoint(WORK / "ref" / "checkpoints")
    out = export_checkpoint(info.path, WORK / "export", "bf16")
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16).cuda()
    logits = model(torch.arange(16, device="cuda")[None]).logits
    assert torch.isfinite(logits.float()).all()
    return {"exported": str(out)}


def check_background_snapshot() -> dict:
    """Background saves on a GPU that is not device 0 where there are two (the writer thread starts on
    device 0): each of 3 saves of different sizes is written with the values it had at the save, although
    the 'next step' queues long work and then overwrites the tensors as soon as wait_until_copied returns;
    the page-locked memory after the 3 saves is one buffer of the largest save, not torch's cached blocks."""
    import torch

    from ds_finetune.checkpoint.async_save import BackgroundWrite, host_pool

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(device)
    streams = []
    for save, megabytes in enumerate((256, 64, 128)):
        state = {f"t{i}": torch.full((megabytes << 18,), float(save * 10 + i), device=device) for i in range(4)}
        writer = BackgroundWrite(rank=0, step=save)
        writer.collect(state, WORK / f"snapshot{save}.pt")
        writer.start()
        x = torch.randn(4096, 4096, device=device)
        for _ in range(50):  # the next forward, on the compute stream
            x = torch.nn.functional.normalize(x @ x, dim=1)
        writer.wait_until_copied()
        for t in state.values():  # the optimizer step
            t.fill_(-1.0)
        writer.wait()
        streams.append(writer.device_copy.stream)
        written = torch.load(WORK / f"snapshot{save}.pt", weights_only=True)
        for i in range(4):
            assert torch.equal(written[f"t{i}"], torch.full((megabytes << 18,), float(save * 10 + i))), (save, i)
    assert all(s is streams[0] for s in streams), "a copy stream a save: torch's pool of 32 would reach DeepSpeed's"
    largest = 4 * (256 << 20)
    pinned = host_pool().pinned_bytes
    assert pinned == largest, (pinned, largest)
    return {"device": str(device), "pinned_bytes_after_3_saves": pinned, "largest_save_bytes": largest,
            "torch_cached_pinned_bytes": torch.cuda.host_memory_stats().get("reserved_bytes.current")}


def _batch_of(rows: int, width: int, prompt: int, isolate: bool):
    """Random right-padded tokens, no attention mask (causal: no real token sees a pad), the first `prompt`
    positions no target; isolated: each row two packed sequences (positions restart), as collate builds."""
    import numpy as np
    import torch

    from ds_finetune.data import IGNORE_INDEX, HostFacts
    from ds_finetune.data.packing import Batch

    ids = torch.randint(3, 500, (rows, width), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[-1, width - 7:] = IGNORE_INDEX  # a shorter last row
    segments = tuple((width // 3, width - width // 3) for _ in range(rows)) if isolate else None
    positions = torch.tensor(np.array([np.concatenate([np.arange(n) for n in row]) for row in segments])) \
        if isolate else None
    return Batch(ids, None, labels, positions, HostFacts.of_labels(labels.numpy(), segments))


def check_host_syncs() -> dict:
    """One micro-step's forward and backward of the fused loss (SFT, an isolated pack) and of DPO's loss
    (precomputed reference) in bf16 under torch.cuda.set_sync_debug_mode("warn"): every host sync warns.
    Ours (anything but transformers' own forward code) must be none; transformers' are counted apart."""
    import os
    import warnings

    import numpy as np
    import torch

    from ds_finetune.device_batch import to_device
    from ds_finetune.objectives.dpo import DPOLoss, Precomputed
    from ds_finetune.loss import ChunkedLoss
    from test_dpo import Engine
    from harness import tiny_model

    model = tiny_model("model.config.attention_dropout=0.0").to("cuda", torch.bfloat16)
    chunked, engine = ChunkedLoss(model, 64), Engine(model)
    sft, pairs = _batch_of(1, 192, 20, isolate=True), _batch_of(4, 96, 30, isolate=False)
    dpo = DPOLoss(chunked.sequence_logps, Precomputed(np.linspace(-90, -10, 4)), 0.1, (("sigmoid", 1.0),), 0.0)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # train.deterministic's kernels, as a run has
    torch.use_deterministic_algorithms(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            (chunked(engine, *to_device(sft, "cuda"), grad_scale=0.01) * 0.01).backward()
            ids, _, labels, _, facts = to_device(pairs, "cuda")
            loss_sum, _ = dpo(engine, ids, None, labels, np.arange(4), facts, grad_scale=0.5)
            (loss_sum * 0.5).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            torch.use_deterministic_algorithms(False)
    syncs = [f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
             if "synchroniz" in str(w.message)]
    ours = [where for where in syncs if not where.startswith("transformers/")]
    assert not ours, f"{len(ours)} host syncs: {sorted(set(ours))}"
    return {"host_syncs": len(ours), "transformers_syncs": sorted(set(syncs) - set(ours))}


def check_lm_head_grad() -> dict:
    """The bf16 LM head's weight gradient of the fused loss against an fp32 reference (autograd through
    fp32 logits of the same values): relative error and time, accumulated in fp32 by addmm (what runs) and
    as a bf16 product per chunk added in fp32 (what ran before)."""
    import torch
    import torch.nn.functional as F

    from ds_finetune import fused_head as loss

    n, hidden, vocab, chunk = 4096, 2048, 32768, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    w32 = w.float().requires_grad_()
    (F.cross_entropy(F.linear(h.float(), w32), t, reduction="sum") / n).backward()

    def fused_grad():
        w16 = w.clone().requires_grad_()
        (loss.fused_linear_cross_entropy(h, w16, None, t, chunk) / n).backward()
        return w16.grad

    def error_and_ms(fp32_sum: bool):
        loss._fp32_addmm[("cuda", torch.bfloat16)] = fp32_sum
        fused_grad()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        grad = fused_grad()
        end.record()
        torch.cuda.synchronize()
        return ((grad.float() - w32.grad).norm() / w32.grad.norm()).item(), start.elapsed_time(end)

    try:
        (before, before_ms), (after, after_ms) = error_and_ms(False), error_and_ms(True)
    finally:
        loss._fp32_addmm.pop(("cuda", torch.bfloat16), None)
    assert after <= 1e-2 and after <= before * 1.05, (after, before)
    return {"rel_error": after, "rel_error_bf16_product": before, "ms": round(after_ms, 2),
            "ms_bf16_product": round(before_ms, 2)}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked")
        return 2
    nproc = args.gpus or min(2, torch.cuda.device_count())
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    summary, failed = {"device": f"{nproc} x {torch.cuda.get_device_name(0)}"}, False
    for name, check in [("resume", lambda: check_resume(nproc)), ("fp16", lambda: check_fp16(nproc)),
                        ("optimizers", lambda: check_optimizers(nproc)),
                        ("fused_adam_conversions", lambda: check_fused_adam_conversions(nproc)),
                        ("export", check_export), ("background_snapshot", check_background_snapshot),
                        ("host_syncs", check_host_syncs), ("lm_head_grad", check_lm_head_grad)]:
        start = time.time()
        try:
            summary[name] = {"ok": True, **check()}
        except Exception as e:  # noqa: BLE001 - every check reports, the exit code says whether all passed
            summary[name], failed = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"}, True
        summary[name]["seconds"] = round(time.time() - start, 1)
        print(f"gpu_check {name}: {'ok' if summary[name]['ok'] else 'FAILED'} ({summary[name]['seconds']} s)",
              flush=True)
    print(json.dumps(summary, indent=1))
    if not failed:
        shutil.rmtree(WORK, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
