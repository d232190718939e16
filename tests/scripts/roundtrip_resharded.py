"""Load a converted (resharded) checkpoint into an engine of each ZeRO stage given (STAGE or STAGE:DTYPE)
and read every fp32 weight (the masters in bf16/fp16) and Adam moment back through DeepSpeed; write the
largest difference per stage (0.0 means exact).

    torchrun --nproc_per_node 2 roundtrip_resharded.py RESHARDED_DIR OUT_JSON 0 1 2 3 0:bf16 3:bf16
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from ds_finetune.checkpoint import ds_internals  # noqa: E402
from ds_finetune.checkpoint import reshard
from ds_finetune.dist import init_distributed  # noqa: E402
from ds_finetune.model import build_engine, build_model  # noqa: E402
from ds_finetune.config import load_config  # noqa: E402
from ds_finetune.zero import zero_config_for_run  # noqa: E402

src, out, targets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rank, world, _ = init_distributed()
copy = reshard.open_resharded(src)
result = {}
for target in targets:
    stage, dtype = (target.split(":") + ["fp32"])[:2]
    stage = int(stage)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                      [f"train.zero_stage={stage}", f"model.dtype={dtype}", "train.micro_batch_size=2", "train.grad_accum=2",
                       "train.max_steps=10", "output_dir=/tmp/unused"])
    ds_config = zero_config_for_run(cfg, world)
    model = build_model(cfg, ds_config)
    reshard.load_weights(model, copy)
    engine = build_engine(model, cfg, ds_config, 10)
    reshard.load_optimizer_state(engine, copy)
    worst, masters = 0.0, ds_internals.stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        if stage == 0:
            master = masters.get(id(p), p)
            state = ds_internals.optimizer_and_state_keys(engine)[0].state[master]
            got = {"weights": master.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        else:
            got = {"weights": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                   "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        for key, value in got.items():
            worst = max(worst, (value.float().cpu() - copy.read(name, key)).abs().max().item())
    result[target] = {"max_abs_diff": worst, "lr": engine.get_lr()[0], "global_steps": engine.global_steps}
if rank == 0:
    out.write_text(json.dumps(result))
os._exit(0)
