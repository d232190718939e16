"""Run ds-finetune's real training (launch/train.py's setup and loop) in this rank and report the memory and
time of every step as JSON; launched by bench/long_context.py under torchrun.

    torchrun --nproc_per_node N bench/children/long_context.py OUT_JSON [--tokens T1,T2,...] --config RUN.yaml [overrides...]

Memory is the kernel's per-process accounting: VmRSS when the engine is built (model, ZeRO partitions, data;
the "base"), the high-water mark VmHWM up to the first step (imports, model, engine: the "startup" peak),
and for every step VmRSS just before it and VmHWM during it, reset before each step (Linux clear_refs 5), so
a step's peak is its own and not an earlier step's. Nothing of the training path is replaced: the
objective's step is wrapped to read /proc around it (and a shortened step runs the objective with its loss
function taking the first tokens of each micro-batch).

`--tokens`: step i trains only the first T_i tokens of each micro-batch it collates (0: all of them); the
run's config sets as many steps. bench/long_context.py trains a short warm-up step (the first all-to-alls,
ZeRO-3's trace of the modules, Adam's state, the gradient buffers: none depends on the length) and then one
step at each measured length in one process, instead of one process a length, ascending, so a step can
reuse the heap a shorter one left but never runs on a longer one's; the bench records each step's
`rss_before` to show what the steps before it left in RSS (glibc keeps freed heap).
"""
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # ds_finetune, and bench/common.py's /proc readers

from ds_finetune import train  # noqa: E402
from ds_finetune.device_batch import facts_of  # noqa: E402
from ds_finetune.dist import all_gather, barrier  # noqa: E402
from ds_finetune.metrics import NullMetricsWriter  # noqa: E402
from common import proc_status, reset_peak  # noqa: E402


class MeasuredStep:
    """The objective with its `step` measured (and shortened to `tokens[i]` at step i + 1); every other
    attribute is the objective's own."""

    def __init__(self, objective, tokens: list[int]):
        self.objective, self.tokens, self.steps, self.startup_peak = objective, tokens, [], None

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def step(self, engine, units, step: int, before_update=None):
        if self.startup_peak is None:
            self.startup_peak = proc_status("VmHWM")
        rss = reset_peak()  # VmHWM := VmRSS
        tokens = self.tokens[len(self.steps)] if len(self.steps) < len(self.tokens) else 0
        objective = replace(self.objective, loss_fn=Shortened(self.objective.loss_fn, tokens)) if tokens \
            else self.objective
        t0 = time.perf_counter()
        result = objective.step(engine, units, step, before_update)
        seconds = time.perf_counter() - t0
        self.steps.append({"tokens": tokens, "rss_before": rss, "peak": proc_status("VmHWM"), "seconds": seconds})
        return result


class Shortened:
    """The objective's loss function on the first `tokens` tokens of every micro-batch (the host's facts of
    the shortened tensors read from them: CPU)."""

    def __init__(self, loss_fn, tokens: int):
        self.loss_fn, self.tokens = loss_fn, tokens

    def __call__(self, engine, input_ids, attention_mask, labels, position_ids=None, facts=None, **kwargs):
        def cut(t):
            return t[:, :self.tokens] if isinstance(t, torch.Tensor) else None
        labels, position_ids = cut(labels), cut(position_ids)
        return self.loss_fn(engine, cut(input_ids), cut(attention_mask), labels, position_ids,
                            facts_of(labels, position_ids=position_ids), **kwargs)


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    tokens = []
    if rest[:1] == ["--tokens"]:
        tokens, rest = [int(t) for t in rest[1].split(",")], rest[2:]
    args = train.parse_args(rest)
    run, state = train.setup(args)
    base = proc_status("VmRSS")  # engine built, data loaded, nothing trained yet
    measured = MeasuredStep(run.objective, tokens)
    run = replace(run, objective=measured)
    metrics = train.MetricsWriter(Path(run.cfg.output_dir), state.step, run.total_steps, False, False, None) \
        if run.rank == 0 else NullMetricsWriter()
    code = train.fit(run, state, metrics, train.StopSignal())
    metrics.close()
    rows = all_gather({"rank": run.rank, "base": base, "startup_peak": measured.startup_peak,
                       "steps": measured.steps})
    if run.rank == 0:
        out.write_text(json.dumps({"ranks": rows, "code": code}))
    barrier()
    sys.stdout.flush()
    os._exit(code)  # as launch/train.py: DeepSpeed/gloo teardown can hang after the work is done


if __name__ == "__main__":
    main()
