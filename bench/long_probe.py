"""Run ds-finetune's real training (launch/train.py's setup and loop) in this rank and report the memory and
time of every step as JSON; launched by bench/long_context.py under torchrun.

    torchrun --nproc_per_node N long_probe.py OUT_JSON [--warmup-tokens N] --config RUN.yaml [overrides...]

Memory is the kernel's per-process accounting: VmRSS when the engine is built (model, ZeRO partitions, data;
the "base"), and for every step VmRSS just before it and the high-water mark VmHWM during it, reset before
each step (Linux clear_refs 5), so a step's peak is its own and not the first step's (which also allocates
the optimizer state). The process's overall peak is kept too. Nothing of the training path is replaced: the
objective's step is wrapped to read /proc around it.

`--warmup-tokens N`: step 1 (the warm-up, never reported as a measurement) trains only the first N tokens
of its micro-batch: what it is for (the first all-to-alls, ZeRO-3's trace of the modules, the gradient
partitions and communication buffers every later step reuses) does not depend on the length, and at 16k
tokens a full-length warm-up costs as much as the measured step. Step 2 and later train the whole sequence.
"""
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_finetune import objective as objective_module  # noqa: E402
from ds_finetune import train  # noqa: E402
from ds_finetune.dist import all_gather, barrier  # noqa: E402
from ds_finetune.metrics import NullMetricsWriter  # noqa: E402


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class MeasuredStep:
    """The objective with its `step` measured; every other attribute is the objective's own."""

    def __init__(self, objective, warmup_tokens: int = 0):
        self.objective, self.steps, self.peak_before = objective, [], status_bytes("VmHWM")
        self.warmup_tokens = warmup_tokens

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def step(self, engine, units, step: int):
        # Read the running peak before resetting it, so the process's overall peak is not lost.
        self.peak_before = max(self.peak_before, status_bytes("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss = status_bytes("VmRSS")
        t0 = time.perf_counter()
        if self.steps or not self.warmup_tokens:
            result = self.objective.step(engine, units, step)
        else:
            result = self.short_step(engine, units, step)
        seconds = time.perf_counter() - t0
        self.steps.append({"rss_before": rss, "peak": status_bytes("VmHWM"), "seconds": seconds})
        return result

    def short_step(self, engine, units, step: int):
        """The objective's step on the first `warmup_tokens` tokens of every micro-batch it collates."""
        collate = objective_module.collate

        def shortened(*args, **kwargs):
            return type(batch := collate(*args, **kwargs))(
                *(None if t is None else t[:, :self.warmup_tokens] for t in batch))
        objective_module.collate = shortened
        try:
            return self.objective.step(engine, units, step)
        finally:
            objective_module.collate = collate


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    warmup_tokens = 0
    if rest[:1] == ["--warmup-tokens"]:
        warmup_tokens, rest = int(rest[1]), rest[2:]
    args = train.parse_args(rest)
    run, state = train.setup(args)
    base = status_bytes("VmRSS")  # engine built, data loaded, nothing trained yet
    measured = MeasuredStep(run.objective, warmup_tokens)
    run = replace(run, objective=measured)
    metrics = train.MetricsWriter(Path(run.cfg.output_dir), state.step, run.total_steps, False, False, None) \
        if run.rank == 0 else NullMetricsWriter()
    code = train.fit(run, state, metrics, train.StopSignal())
    metrics.close()
    peak = max([measured.peak_before, status_bytes("VmHWM")] + [s["peak"] for s in measured.steps])
    rows = all_gather({"rank": run.rank, "base": base, "peak": peak, "steps": measured.steps})
    if run.rank == 0:
        out.write_text(json.dumps({"ranks": rows, "code": code}))
    barrier()
    sys.stdout.flush()
    os._exit(code)  # as launch/train.py: DeepSpeed/gloo teardown can hang after the work is done


if __name__ == "__main__":
    main()
