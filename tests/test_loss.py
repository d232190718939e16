"""The fused linear cross-entropy of the chunked loss, in process: its loss and gradients (hidden, weight,
bias) against `F.cross_entropy(hidden @ W.T + b)` with autograd, and the chunked loss of a tiny model
against the full-logits path (tied and untied embeddings, gradient checkpointing). ZeRO 0-3 is
covered by the one-step comparison in test_training.py. A step of the fused loss reads no value back from
the device (tests/host_syncs.py), and a bf16 head's weight gradient is summed in fp32 without a bf16 product
where the device can."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness
from ds_finetune.data import IGNORE_INDEX, HostFacts
from ds_finetune.errors import UserError
from ds_finetune.fused_head import (FusedLinearCrossEntropy, _accumulates_in_fp32, _add_weight_grad, _chunked_ce,
                                    fused_linear_cross_entropy)
from ds_finetune.loss import ChunkedLoss, full_loss_sum
from host_syncs import recording_host_syncs


def inputs(n=50, hidden=16, vocab=97, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


def loss_and_grads(fn, h, w, b, t, scale):
    params = [x for x in (h, w, b) if x is not None]
    for x in params:
        x.grad = None
    loss = fn(h, w, b, t)
    (loss * scale).backward()
    return loss.detach(), [x.grad.clone() for x in params]


def reference(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")


def assert_close(actual, expected, rel):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rel * max(1.0, expected.float().abs().max().item()), diff


@pytest.mark.parametrize("chunk", [1, 7, 50, 256])  # one row a chunk, uneven chunks, exactly one, more than all
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_gradients_equal_the_reference(chunk, bias):
    h, w, b, t = inputs(bias=bias)
    scale = 0.37  # what accumulate's normalisation does to the incoming gradient
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, scale)
    loss, grads = loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, chunk), h, w, b, t, scale)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 1e-6)


def test_the_comparison_fails_for_a_wrong_reduction_or_gradient():
    """The tolerance above separates right from wrong: a mean instead of a sum, or the gradient of the
    softmax without the target's -1, is far outside it."""
    h, w, b, t = inputs()
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, 1.0)
    mean_loss, _ = loss_and_grads(lambda *a: reference(*a) / t.numel(), h, w, b, t, 1.0)
    assert mean_loss.item() != pytest.approx(ref_loss.item(), rel=1e-6)
    no_onehot = torch.softmax(F.linear(h, w, b).float(), -1).detach()
    with pytest.raises(AssertionError):
        assert_close(no_onehot.t() @ h.detach(), ref_grads[1], 1e-6)


def test_bf16_head_upcasts_each_chunk():
    """bf16 weights: fp32 loss from upcast logits; gradients in bf16 as the reference's, to bf16 rounding."""
    h, w, b, t = inputs(dtype=torch.bfloat16, bias=False)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, 0.01)
    loss, grads = loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, 16), h, w, b, t, 0.01)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 2e-2)


def test_no_grad_and_frozen_inputs_take_no_gradient():
    h, w, b, t = inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, b, t, 7)
    assert loss.grad_fn is None and loss.item() == pytest.approx(reference(h, w, b, t).item(), rel=1e-6)
    frozen = w.detach()  # a frozen head: only hidden gets a gradient
    fused_linear_cross_entropy(h, frozen, None, t, 7).backward()
    assert h.grad is not None and frozen.grad is None


def test_no_target_gives_zero_loss_and_zero_gradients():
    h, w, b, t = inputs(n=0)
    loss = fused_linear_cross_entropy(h, w, b, t, 7)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().sum() == 0 and h.grad.shape == h.shape


def test_a_second_backward_through_the_same_graph_is_refused():
    h, w, b, t = inputs()
    loss = FusedLinearCrossEntropy.apply(h, w, b, t, 7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# ----------------------------------------------------------------------------------- in the model

def batch(seed=1, rows=3, length=40, vocab=512):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 30:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :12] = IGNORE_INDEX  # prompts
    labels[2, 30:] = IGNORE_INDEX
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("overrides", [
    [], ["model.config.tie_word_embeddings=true"], ["train.gradient_checkpointing=true"],
    ["model.config.tie_word_embeddings=true", "train.gradient_checkpointing=true"],
])
def test_chunked_loss_of_the_model_equals_the_full_logits_path(overrides):
    model = harness.tiny_model("model.config.attention_dropout=0.0", *overrides)
    chunked = ChunkedLoss(model, 7)
    results = []
    for loss_fn in (full_loss_sum, chunked, full_loss_sum):  # the hook stays idle during full_loss_sum
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, *batch())
        (loss * 0.01).backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (ours, grads), (again, _) = results
    assert again == full
    assert ours == pytest.approx(full, rel=1e-6)
    assert set(grads) == set(full_grads)
    for name, g in grads.items():
        assert_close(g, full_grads[name], 1e-6)
    assert "forward" not in vars(model.get_output_embeddings())  # the head's own forward is back


def test_a_head_that_is_not_a_linear_is_refused():
    model = harness.tiny_model()
    model.set_output_embeddings(torch.nn.Sequential(torch.nn.Linear(64, 512)))
    with pytest.raises(UserError, match="not a Linear"):
        ChunkedLoss(model, 7)


def test_a_model_that_transforms_its_logits_is_refused():
    model = harness.tiny_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="final_logit_softcapping"):
        ChunkedLoss(model, 7)


def fp16_grads(fn):
    """grad_W in fp16 of an fp16 head whose softmax has many terms below fp16's smallest subnormal
    (~6e-8): a wide vocabulary, spread logits; backward brings fp16's loss scale times a 1/targets
    normalisation. Also the fp32 path's grad_W, for reference."""
    h, w, _, t = inputs(n=64, hidden=16, vocab=4000, bias=False, seed=3)
    expected_grad = 2.0**16 / 4000  # loss scale x normalisation
    h16, w16 = (h.detach() * 1).half().requires_grad_(), (w.detach() * 6).half().requires_grad_()
    (fn(h16, w16, t, expected_grad) * expected_grad).backward()
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    (reference(h32, w32, None, t) * expected_grad).backward()
    return w16.grad, w32.grad


def full_path(h, w, t, expected_grad):  # fp32 logits: the scale multiplies before anything is fp16 again
    return reference(h, w, None, t)


def flushed(grad: torch.Tensor) -> float:
    return (grad == 0).float().mean().item()


def test_fp16_head_keeps_small_softmax_terms_with_the_loss_scale():
    """The fused loss in fp16 with a loss scale equals the fp32 path within fp16 rounding, and flushes no
    more gradient entries to zero than the full-logits fp16 path: the scale multiplies the softmax before
    the cast to fp16, as in the full path's fp32 logits."""
    got, want = fp16_grads(lambda h, w, t, g: fused_linear_cross_entropy(h, w, None, t, 16, grad_scale=g))
    full, _ = fp16_grads(full_path)
    assert got.dtype == torch.float16
    assert ((got.float() - want).norm() / want.norm()).item() < 5e-3
    assert flushed(full) > 0.1  # the case does reach below fp16's range
    assert flushed(got) <= flushed(full) + 0.005


def test_fp16_head_without_the_scale_loses_the_small_terms():
    """What the test above guards against: cast first, scale in backward, and many more entries flush."""
    got, _ = fp16_grads(lambda h, w, t, g: fused_linear_cross_entropy(h, w, None, t, 16))  # no expected grad
    full, _ = fp16_grads(full_path)
    assert flushed(got) > flushed(full) + 0.1


# ------------------------------------------------------------------------------------- host syncs

def test_the_sync_recorder_sees_what_waits_for_the_device():
    """What the tests below count: every read of a value (item, float, tolist, cpu), a boolean mask and a
    repeat_interleave that must count their output; not integer indexing, nor repeats given their total."""
    x, mask, repeats = torch.arange(6.0), torch.tensor([True, False] * 3), torch.tensor([1, 2, 3, 0, 0, 0])
    with recording_host_syncs() as syncs:
        x.sum().item(), float(x[0]), x.tolist(), x.cpu(), x[mask], torch.repeat_interleave(x, repeats)
    assert [what for what, _ in syncs.found] == [
        "aten._local_scalar_dense.default", "aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.cpu",
        "aten.index.Tensor", "aten.repeat_interleave.Tensor"]
    assert all(where == "elsewhere" for _, where in syncs.found)  # this file is neither ours nor a library
    with recording_host_syncs() as syncs:
        x[torch.tensor([0, 2])], torch.repeat_interleave(x, repeats, output_size=6), x * 2
    assert syncs.found == []


def our_syncs(syncs) -> list:
    """Syncs in our code, or in a backward kernel of ours (no Python frame: 'elsewhere'); transformers' own
    (its sdpa mask reads the padding mask once a forward) are not ours to remove."""
    return syncs.by("ds_finetune/") + syncs.by("elsewhere")


@pytest.mark.parametrize("overrides", [[], ["train.gradient_checkpointing=true"]])
def test_a_chunked_loss_step_reads_nothing_back_from_the_device(overrides):
    """Forward and backward of the fused loss on a collated batch (its HostFacts built on the host): no
    value of a tensor is read back (on CUDA each would wait for every kernel queued before it)."""
    model = harness.tiny_model("model.config.attention_dropout=0.0", *overrides)
    input_ids, attention_mask, labels = batch()
    facts = HostFacts.of_labels(labels.numpy())
    token_losses = torch.empty(int(facts.targets.sum()))
    chunked = ChunkedLoss(model, 7)
    with recording_host_syncs() as syncs:
        loss = chunked(model, input_ids, attention_mask, labels, None, facts, grad_scale=0.01,
                       token_losses=token_losses)
        (loss * 0.01).backward()
    assert our_syncs(syncs) == []
    model.zero_grad()
    with recording_host_syncs() as syncs:  # the same step from tensors alone reads the facts back: seen
        (chunked(model, input_ids, attention_mask, labels) * 0.01).backward()
    assert our_syncs(syncs)


def test_the_full_logits_path_takes_per_token_losses_without_a_mask():
    model = harness.tiny_model("model.config.attention_dropout=0.0")
    input_ids, attention_mask, labels = batch()
    facts = HostFacts.of_labels(labels.numpy())
    token_losses, chunked_losses = torch.empty(int(facts.targets.sum())), torch.empty(int(facts.targets.sum()))
    with recording_host_syncs() as syncs:
        total = full_loss_sum(model, input_ids, attention_mask, labels, None, facts, token_losses=token_losses)
    assert our_syncs(syncs) == []
    ChunkedLoss(model, 7)(model, input_ids, attention_mask, labels, None, facts, token_losses=chunked_losses)
    assert float(token_losses.sum()) == pytest.approx(float(total.detach()), rel=1e-6)
    torch.testing.assert_close(token_losses, chunked_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, pre_scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 3e4)])
def test_backward_scales_by_the_incoming_gradient_as_the_python_number_did(dtype, pre_scale):
    """The incoming gradient stays on the device; the gradients equal those scaled by it read as a Python
    number (the float64 division, then fp32 arithmetic): bitwise."""
    h, w, b, t = inputs(dtype=dtype, bias=False)
    grad = torch.tensor(0.3719, dtype=torch.float32)
    FusedLinearCrossEntropy.apply(h, w, b, t, 7, pre_scale).backward(grad)
    _, g_hidden, g_weight, _ = _chunked_ce(h.detach(), w.detach(), None, t, 7, True, True, pre_scale)
    scale = float(grad) / (pre_scale if dtype == torch.float16 else 1.0)
    assert torch.equal(h.grad, g_hidden.mul_(scale).to(dtype)) and torch.equal(w.grad, g_weight.mul_(scale).to(dtype))


def test_a_half_heads_weight_gradient_accumulates_in_fp32_where_the_device_has_it(monkeypatch):
    """Where addmm takes half inputs into an fp32 sum (CUDA; the meta device shows the call) the weight's
    gradient is one addmm into the fp32 buffer; on the CPU it is the product in the head's dtype added in
    fp32, and an fp32 head's is addmm_: the same bits as before."""
    calls = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k) or real_addmm(*a, **k))
    g, h = (torch.randn(5, 9).to(torch.bfloat16) for _ in range(2))
    acc = torch.randn(9, 9)
    on_meta = acc.to("meta")
    _add_weight_grad(on_meta, g.to("meta"), h.to("meta"))
    assert calls[-1]["out"] is on_meta and calls[-1]["out_dtype"] == torch.float32
    calls.clear()
    got = acc.clone()
    _add_weight_grad(got, g, h)  # the CPU refuses out_dtype: the product in bf16, summed in fp32
    assert torch.equal(got, acc + g.t() @ h) and not _accumulates_in_fp32(g.device, g.dtype)
    g32, h32, got = g.float(), h.float(), acc.clone()
    _add_weight_grad(got, g32, h32)
    assert torch.equal(got, acc.clone().addmm_(g32.t(), h32))
