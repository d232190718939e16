"""The LM head fused with what follows it, `chunk_tokens` target positions at a time, so that the logits of
every position never exist at once: the cross-entropy with its gradients taken in the forward
(`FusedLinearCrossEntropy`, the training loss), and each target's log-prob with its gradient recomputed in
backward (`FusedLinearTokenLogps`, the preference objectives' log-probs, whose gradient weights only the
whole batch decides). `loss.ChunkedLoss` runs them as the head's forward inside the model.

A change here that sums the token losses or their gradients in another order changes a run's weights at
float-noise level: give it a new `fingerprint.CHUNKED_LOSS_IMPLEMENTATION` (for the dtypes it changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------- fused linear + CE

def _chunked_ce(hidden, weight, bias, targets, chunk_tokens: int, grad_hidden: bool, grad_weight: bool,
                grad_scale: float = 1.0, token_losses=None, correct=None):
    """Summed CE of `hidden @ weight.T + bias` against `targets` (fp32), `chunk_tokens` rows at a time,
    and, as asked, the gradients of that sum for hidden, weight and bias (None where not asked).

    Per chunk: logits in the head's dtype, upcast to fp32 as the full path does; loss = log(sum(exp(x -
    max))) + max - the target's logit; d loss / d logits = softmax - onehot. All of it happens in place in
    one fp32 logits buffer reused by every chunk: a fresh chunk-sized tensor per step (logsumexp's
    temporaries, say) costs more in page faults on CPU than the arithmetic. The gradient goes back to the
    head's dtype (as the full path's `.float()` backward does) for the two matmuls: grad_hidden = g @ W and
    grad_W += g.T @ h. grad_W and grad_bias sum over chunks in fp32, so a bf16 head does not round once per
    chunk (the full path sums all rows inside one matmul; `_add_weight_grad`).

    An fp16 head: fp16 flushes values below ~6e-8 to zero, so backward's incoming gradient (the loss scale
    times accumulate's normalisation) must multiply the softmax before the cast, as it does in the full
    path's fp32 logits. It is not known yet, so `grad_scale` (its expected value) is applied here and
    divided out in backward; grad_W and grad_bias then stay fp32 until backward has scaled them.

    `correct` (a 0-dim tensor), where given, is added the number of targets whose logit is the row's largest
    (TRL's mean_token_accuracy counts them), from the row maxima the loss takes anyway: no extra vocab pass."""
    n, fp32_head = targets.numel(), weight.dtype == hidden.dtype == torch.float32
    fp16_head = weight.dtype == torch.float16
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    g_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
              if grad_weight and bias is not None else None)
    buffer = torch.empty((min(n, chunk_tokens), weight.size(0)), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        logits = buffer[:t.numel()]
        if not fp32_head:
            logits.copy_(F.linear(h, weight, bias))
        elif bias is None:  # what F.linear computes, written into the buffer
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        target_logit = logits.gather(1, t[:, None])
        row_max = logits.amax(1, keepdim=True)
        if correct is not None:
            correct += (target_logit >= row_max).sum()
        exp = logits.sub_(row_max).exp_()
        row_sum = exp.sum(1, keepdim=True)
        losses = row_sum.log() + row_max - target_logit
        total += losses.sum()
        if token_losses is not None:  # per-source metrics: a copy, the sum above is unchanged
            token_losses[start:start + t.numel()] = losses[:, 0].detach()
        if not (grad_hidden or grad_weight):
            continue
        g = exp.div_(row_sum)  # softmax
        g[torch.arange(t.numel(), device=g.device), t] -= 1.0
        if fp16_head:
            g.mul_(grad_scale)
        g = g.to(weight.dtype)
        if grad_hidden:
            torch.mm(g, weight, out=g_hidden[start:start + chunk_tokens])
        if grad_weight:
            _add_weight_grad(g_weight, g, h)
            if g_bias is not None:
                g_bias += g.sum(0, dtype=torch.float32)
    if g_weight is not None and not fp16_head:
        g_weight = g_weight.to(weight.dtype)
        g_bias = None if g_bias is None else g_bias.to(bias.dtype)
    return total, g_hidden, g_weight, g_bias


def _add_weight_grad(g_weight, g, h) -> None:
    """g_weight (fp32) += g.T @ h. An fp32 head: one addmm in place. A bf16 or fp16 head where the device
    has it (CUDA, torch >= 2.9): one addmm that multiplies in the head's dtype and accumulates straight into
    the fp32 buffer; `g.T @ h` would first write a vocab x hidden product in the head's dtype per chunk and
    read it back to add it (~170 GB of memory traffic a micro-step for Llama-3-8B at 8k targets). Elsewhere
    (the CPU) that product, summed in fp32."""
    if g.dtype == torch.float32:
        g_weight.addmm_(g.t(), h)
    elif _accumulates_in_fp32(g.device, g.dtype):
        torch.addmm(g_weight, g.t(), h, out_dtype=torch.float32, out=g_weight)
    else:
        g_weight += g.t() @ h


_fp32_addmm: dict = {}  # (device type, dtype) -> whether addmm takes an fp32 sum of half inputs there


def _accumulates_in_fp32(device, dtype) -> bool:
    """addmm(fp32, half, half, out_dtype=fp32) runs on this kind of device (CUDA from torch 2.9; the CPU
    and older torch refuse it). Tried once a process on a 2 x 2 product."""
    key = (device.type, dtype)
    if key not in _fp32_addmm:
        a = torch.zeros((2, 2), dtype=dtype, device=device)
        try:
            torch.addmm(torch.zeros((2, 2), device=device), a, a, out_dtype=torch.float32)
            _fp32_addmm[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _fp32_addmm[key] = False
    return _fp32_addmm[key]


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T + bias, targets[i]) whose gradients are computed in the forward.

    Checkpointing each chunk (recomputing its logits in backward) costs one more head matmul per token;
    here the forward does the three matmuls the full path does (logits, grad of hidden, grad of the
    weight) while the chunk's logits exist, and keeps only the gradients (the size of hidden and of the
    weight). Backward scales them by the incoming scalar gradient (accumulate's normalisation, a loss
    scale); the weight's gradient is returned for the weight input, so it reaches the parameter through
    autograd as any layer's does (ZeRO's gradient hooks see it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, grad_scale=1.0, token_losses=None, correct=None):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        total, g_hidden, g_weight, g_bias = _chunked_ce(hidden, weight, bias, targets, chunk_tokens,
                                                         want_hidden, want_weight, grad_scale, token_losses, correct)
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        ctx.pre_scale = grad_scale if weight.dtype == torch.float16 else 1.0
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # The stored gradients are scaled in place (no second copy of the weight's gradient), so the
        # graph cannot be walked twice; say so rather than return twice-scaled gradients.
        if ctx.used:
            raise RuntimeError("FusedLinearCrossEntropy: backward through the same graph twice is not supported")
        ctx.used = True
        scale = _fp32_scale(grad_output, ctx.pre_scale)
        grads = [None if g is None else g.mul_(scale).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def _fp32_scale(grad_output, pre_scale: float) -> torch.Tensor:
    """grad_output / pre_scale as a one-element fp32 tensor on the device: read as a Python number it would
    wait for the device. bf16 gradients are then scaled in fp32 arithmetic, the scale not rounded to bf16
    (it is ~1/targets: rounding it would bias every gradient of the step alike). One element, not zero
    dimensions: a 0-dim tensor takes no part in type promotion, so on CUDA bf16 x 0-dim fp32 would round the
    scale to bf16 first. The division in float64, as Python's was: the same fp32 scale as before."""
    return (grad_output.double() / pre_scale).float().reshape(1)


def fused_linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens: int, grad_scale: float = 1.0,
                               token_losses=None, correct=None) -> torch.Tensor:
    """Summed CE of the head over rows of `hidden` (2-D) against `targets`; no gradients are taken in
    forward when none can be asked for (evaluation under no_grad). `grad_scale`: the gradient backward is
    expected to bring (used by fp16 heads only, see `_chunked_ce`)."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not needs_grad:
        return _chunked_ce(hidden, weight, bias, targets, chunk_tokens, False, False, token_losses=token_losses,
                           correct=correct)[0]
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, grad_scale, token_losses, correct)


# ------------------------------------------------------------- per-sequence log-probs (preference)

def _chunk_logits(h, weight, bias, buffer):
    """The chunk's logits in fp32, written into `buffer` (as `_chunked_ce` computes them)."""
    if weight.dtype == h.dtype == torch.float32:
        return torch.mm(h, weight.t(), out=buffer) if bias is None else torch.addmm(bias, h, weight.t(), out=buffer)
    return buffer.copy_(F.linear(h, weight, bias))


def _token_logps(hidden, weight, bias, targets, chunk_tokens: int, temperature: float = 1.0,
                 entropy: torch.Tensor | None = None, stats=None) -> torch.Tensor:
    """log p(target) of every row of `hidden` (fp32), `chunk_tokens` rows at a time, of the logits divided by
    `temperature` (GRPO's, as TRL's fused head); with `entropy` (a buffer of one float a row) each row's
    entropy of that distribution is written there too (no gradient). `stats` ([n, 2] fp32, or None) receives
    each row's mean logit over the vocabulary and whether the target is its top logit (TRL's `logits/*` and
    `mean_token_accuracy`): one more reduction over a chunk, no gradient."""
    n = targets.numel()
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty((min(n, chunk_tokens), weight.size(0)), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        t = targets[start:start + chunk_tokens]
        logits = _chunk_logits(hidden[start:start + chunk_tokens], weight, bias, buffer[:t.numel()])
        if temperature != 1.0:
            logits.div_(temperature)
        target_logit = logits.gather(1, t[:, None])[:, 0]
        row_max = logits.amax(1)
        if stats is not None:
            stats[start:start + t.numel(), 0] = logits.detach().mean(1)
            stats[start:start + t.numel(), 1] = (target_logit >= row_max).float()
        if entropy is None:
            out[start:start + t.numel()] = target_logit - row_max - logits.sub_(row_max[:, None]).exp_().sum(1).log_()
            continue
        shifted = logits.sub_(row_max[:, None])
        exp = shifted.exp()
        log_sum = exp.sum(1).log_()
        out[start:start + t.numel()] = target_logit - row_max - log_sum
        # H = log S - sum(e * (x - max)) / S, with e = exp(x - max) and S = sum(e)
        entropy[start:start + t.numel()] = log_sum - (exp * shifted).sum(1) / log_sum.exp()
    return out


def segment_sums(values, counts: list[int]) -> torch.Tensor:
    """Sums of consecutive segments of `values` (a sequence's tokens are consecutive): one sum per segment,
    each in a fixed order (no atomics: the same bits on every device and run)."""
    return torch.stack([part.sum() for part in torch.split(values, counts)])


class FusedLinearTokenLogps(torch.autograd.Function):
    """log p(target) of every row of `hidden` through the head, `chunk_tokens` rows at a time; never all logits.

    The gradient of a token's log-prob is weighted by a number that only the whole batch's log-probs decide
    (DPO's sigmoid of the margin, ORPO's odds ratio), so it cannot be taken in the forward as the token
    loss's is: the forward keeps no logits (its output is one float a token), and backward recomputes each
    chunk's logits once (one head matmul more than the forward's), forms w x (onehot - softmax) with each
    token's incoming gradient w, and takes the gradients of hidden (g @ W) and of the head (g.T @ h, summed
    over chunks in fp32). Sums per sequence are taken outside, by autograd (`segment_sums`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, temperature=1.0, entropy=None, stats=None):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_tokens, ctx.temperature = chunk_tokens, temperature
        return _token_logps(hidden, weight, bias, targets, chunk_tokens, temperature, entropy, stats)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, n, temperature = ctx.chunk_tokens, targets.numel(), ctx.temperature
        w = grad_output.float()
        if temperature != 1.0:  # d logits / d (h W^T + b) = 1 / temperature
            w = w / temperature
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        g_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        buffer = torch.empty((min(n, chunk), weight.size(0)), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = _chunk_logits(h, weight, bias, buffer[:t.numel()])
            if temperature != 1.0:
                logits.div_(temperature)
            row_max = logits.amax(1, keepdim=True)
            g = logits.sub_(row_max).exp_()
            g.div_(g.sum(1, keepdim=True)).mul_(-w[start:start + t.numel(), None])  # -w x softmax
            g[torch.arange(t.numel(), device=g.device), t] += w[start:start + t.numel()]
            g = g.to(weight.dtype)
            if g_hidden is not None:
                torch.mm(g, weight, out=g_hidden[start:start + chunk])
            if g_weight is not None:
                _add_weight_grad(g_weight, g, h)
            if g_bias is not None:
                g_bias += g.sum(0, dtype=torch.float32)
        return (g_hidden, None if g_weight is None else g_weight.to(weight.dtype),
                None if g_bias is None else g_bias.to(bias.dtype), None, None, None, None, None)


def fused_token_logps(hidden, weight, bias, targets, chunk_tokens: int, temperature: float = 1.0,
                      entropy: torch.Tensor | None = None, stats=None) -> torch.Tensor:
    """log p(target) of every row of `hidden` (one float each, fp32), with gradients where asked for; of the
    logits over `temperature`; each row's entropy into `entropy` and its statistics into `stats` where given
    (see `_token_logps`)."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not needs_grad:
        return _token_logps(hidden, weight, bias, targets, chunk_tokens, temperature, entropy, stats)
    return FusedLinearTokenLogps.apply(hidden, weight, bias, targets, chunk_tokens, temperature, entropy, stats)


def fused_sequence_logps(hidden, weight, bias, targets, counts: list[int], chunk_tokens: int,
                         stats=None) -> torch.Tensor:
    """Summed log-probs of `targets` per sequence (`counts` consecutive rows of `hidden` each)."""
    return segment_sums(fused_token_logps(hidden, weight, bias, targets, chunk_tokens, stats=stats), counts)
