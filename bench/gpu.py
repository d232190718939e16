"""GPU section (runs only where torch.cuda.is_available()): ds-finetune's real loop on a ~0.5B Llama in
bf16 at ZeRO-2 and ZeRO-3 on every visible GPU; tokens/s and MFU, with `train.deterministic` on (the
default: what exact resume needs) and off (the kernels' fastest choice), so the cost of determinism shows.

Tokens are the real (unpadded) tokens of each step, from metrics.jsonl's `num_tokens` field; rows are packed
to 1024 tokens. MFU = (6 N + 12 L H T) FLOPs a token x tokens/s / (peak dense bf16 FLOP/s x GPUs), the
PaLM accounting (N parameters, L layers, H hidden size, T sequence length); None for an unknown GPU.
"""

from __future__ import annotations

import shutil

from common import WORK, Job, llama, llama_params, log, long_rows, ours_argv, read_jsonl, run_config, warm_cache

WARMUP = 3
SEQ = 1024
# Peak dense bf16 tensor-core FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 125e12, "L4": 121e12}
# ~0.48B parameters: 24 layers of hidden 1280 (20 heads of 64), MLP 3456; the shipped 512-token vocabulary.
MODEL = llama(1280, 24, 3456, 20, 20, SEQ)


def gpu_state() -> tuple[bool, str]:
    import torch
    if not torch.cuda.is_available():
        return False, "skipped: no CUDA device (torch.cuda.is_available() is False on this machine)"
    return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16.items():  # "H100 PCIe" is tested before "H100"
        if key in name:
            return flops
    return None


def run_stage(stage: int, deterministic: bool, steps: int, ngpu: int) -> dict:
    name = f"gpu-zero{stage}-{'det' if deterministic else 'fast'}"
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    data = long_rows()
    config = run_config(name, MODEL, data,
                        max_length=SEQ, micro=8, accum=1, steps=steps, output_dir=out, model={"dtype": "bf16"},
                        data={"packing": True}, train={"zero_stage": stage, "deterministic": deterministic})
    warm_cache(config)
    job = Job(ours_argv(config, nproc=ngpu), WORK / "logs" / f"{name}.log", gpu=True).start()
    job.wait(900)
    rows = read_jsonl(out / "metrics.jsonl")[WARMUP:]
    tokens_per_s = (rows[-1]["num_tokens"] - rows[0]["num_tokens"]) / (rows[-1]["time"] - rows[0]["time"])
    return {"tokens_per_s": tokens_per_s, "steps": len(rows) - 1}


def run(quick: bool) -> dict:
    ok, what = gpu_state()
    if not ok:
        log(f"GPU section {what}")
        return {"skipped": what, "figures": []}
    import torch
    ngpu, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    n = llama_params(MODEL)
    flops_per_token = 6 * n + 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * SEQ
    peak = peak_flops(name)
    figures, raw = [], {"device": what, "params": n, "flops_per_token": flops_per_token, "peak_bf16": peak}
    for stage in (2, 3):
        for deterministic in (True, False):
            r = run_stage(stage, deterministic, WARMUP + (6 if quick else 20), ngpu)
            mfu = flops_per_token * r["tokens_per_s"] / (peak * ngpu) if peak else None
            kernels = "deterministic" if deterministic else "non-deterministic"
            raw[f"zero{stage}_{kernels}"] = {**r, "mfu": mfu}
            log(f"GPU ZeRO-{stage} ({kernels}): {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%}" if mfu is not None
                else f"GPU ZeRO-{stage} ({kernels}): {r['tokens_per_s']:,.0f} tokens/s (MFU: unknown peak for {name})")
            peak_text = f"peak {peak / 1e12:.0f} TFLOP/s a GPU" if peak else f"peak unknown for {name}"
            figures.append({"id": f"gpu_zero{stage}" + ("" if deterministic else "_nondeterministic"),
                            "figure": f"GPU bf16 ZeRO-{stage}, {n / 1e9:.2f}B Llama, {kernels} kernels (ratio = MFU)",
                            "ours": r["tokens_per_s"], "baseline": None, "unit": "tokens/s",
                            "ratio": mfu, "target": None, "met": None,
                            "note": f"{what}; packed seq {SEQ}, micro 8 a GPU; {r['steps']} steady steps; "
                                    f"train.deterministic={deterministic}; {peak_text}"})
    return {"figures": figures, "raw": raw}
