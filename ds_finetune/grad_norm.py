"""The step's gradient norm, logged as `grad_norm` every step (the HF Trainer's and TRL's key): the global
2-norm of the gradients before clipping.

DeepSpeed computes it wherever it clips or checks for overflow and reports it through
`engine.get_global_grad_norm()`: ZeRO 1-3 and the bf16/fp16 wrappers. A ZeRO-0 fp32 run hands its client
optimizer the gradients untouched and DeepSpeed keeps no norm (its clipping discards the value), so there it
is computed here, as DeepSpeed's `clip_grad_norm_` computes it, right before the update: the gradients are
reduced over the ranks by then. Nothing is read back to the host here; the loop's one all-reduce carries it.
"""

from __future__ import annotations

import torch

from ds_finetune.ds_internals import reports_grad_norm


class GradNorm:
    def __init__(self, engine):
        self.engine = engine
        self.own = None if reports_grad_norm(engine) else torch.zeros((), device=engine.device)

    def before_update(self) -> None:
        """Every rank, after the step's last backward and before the optimizer changes the gradients."""
        if self.own is None:
            return
        norms = [p.grad.detach().float().norm(2) for p in self.engine.module.parameters() if p.grad is not None]
        self.own = torch.stack(norms).pow(2).sum().pow(0.5) if norms else torch.zeros((), device=self.engine.device)

    def value(self):
        """The last step's norm (a number or a tensor on the device); None where DeepSpeed was told not to
        compute it (zero_optimization.compute_grad_norm: false), the same on every rank."""
        return self.own if self.own is not None else self.engine.get_global_grad_norm()
