"""train.tiled_mlp (DeepSpeed's TiledMLP on every decoder layer's MLP), in process: the loss and every
gradient equal the untiled model's to 1e-6, with several tiles and a last tile shorter than the others, and
padded to a longer rank's length (agreed once a forward, also under gradient checkpointing; never in a
generation forward);
a model without a dense MLP in its layers is refused in one line; the setting is an exact fingerprint key
only when on."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_finetune.config import load_config
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import config_fingerprint
from ds_finetune.tiled_mlp import apply_tiled_mlp
from test_config import TINY

HIDDEN = 16


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=HIDDEN, intermediate_size=40,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=128, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tokens", [66, 64])  # 5 tiles, the last shorter; 4 equal tiles
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(tokens):
    ids = torch.randint(0, 64, (2, tokens), generator=torch.Generator().manual_seed(1))
    plain, tiled = tiny_llama(), tiny_llama()
    assert apply_tiled_mlp(tiled) == 2
    loss, grads = loss_and_grads(plain, ids)
    tiled_loss, tiled_grads = loss_and_grads(tiled, ids)
    assert abs(float(loss - tiled_loss)) <= 1e-6
    assert grads.keys() == tiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_the_ranks_agree_on_the_length_once_a_forward_and_pad_to_it(monkeypatch):
    """Under gradient checkpointing each layer's MLP runs twice a step; the ranks still agree on the tile
    count once (one all-reduce, here faked as another rank 3 tokens longer), and the zero rows this rank is
    padded with change neither the loss nor a gradient."""
    from ds_finetune import tiled_mlp
    agreements = []
    monkeypatch.setattr(tiled_mlp, "max_over_ranks", lambda tokens: agreements.append(tokens) or tokens + 3)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    plain, tiled = tiny_llama(), tiny_llama()
    apply_tiled_mlp(tiled)
    tiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiled.train()
    loss, grads = loss_and_grads(plain, ids)
    tiled_loss, tiled_grads = loss_and_grads(tiled, ids)
    assert agreements == [40]
    assert abs(float(loss - tiled_loss)) <= 1e-6
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_generation_forward_agrees_on_nothing_and_computes_the_untiled_logits(monkeypatch):
    """GRPO's rollout: each rank runs as many forwards (with a KV cache) as its own completions need, with
    the weights whole, so such a forward must not be a collective: ranks that finished sooner would never
    join it, and the job would hang. A training or eval forward still agrees."""
    from ds_finetune import tiled_mlp
    agreements = []
    monkeypatch.setattr(tiled_mlp, "max_over_ranks", lambda tokens: agreements.append(tokens) or tokens)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    plain, tiled = tiny_llama(), tiny_llama()
    apply_tiled_mlp(tiled)
    with torch.no_grad():
        want, got = plain(input_ids=ids, use_cache=True).logits, tiled(input_ids=ids, use_cache=True).logits
        assert agreements == []
        tiled(input_ids=ids)
    assert agreements == [40]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_model_without_dense_mlps_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        apply_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert "train.tiled_mlp" in e.value.message and "\n" not in e.value.message


def test_tiled_mlp_is_an_exact_key_only_when_on():
    def exact(overrides):
        return config_fingerprint(load_config(str(TINY), overrides), 8, "hash")["exact"]
    assert "train.tiled_mlp" not in exact([])  # checkpoints from before the setting still match
    assert exact(["train.tiled_mlp=true"])["train.tiled_mlp"] is True
