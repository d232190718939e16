"""`train.tiled_mlp: true`: every decoder layer's MLP runs over the sequence in tiles, with DeepSpeed's
TiledMLP as Arctic Long Sequence Training applies it. A gated MLP holds ~3 x intermediate_size floats a token
while it runs (gate, up, their product), the largest activation of a layer at long lengths; tiled, they exist
for one tile at a time, and only the MLP's input is kept for backward, which recomputes each tile's forward.

The tiles follow ALST: ceil(tokens / hidden_size) of them, so a tile's intermediate is about the size of the
layer's hidden states. Under ZeRO-3 each tile gathers the MLP's weights, so every rank must run the same
number of tiles: the ranks agree on the longest input, and a shorter one is padded with zero rows. They
agree once a forward of the model (not in every layer's forward and in its recompute under gradient
checkpointing), on the host (`dist.max_over_ranks`: a gloo all-reduce, so no wait for the GPU); not in
generation, whose forwards gather nothing.
"""

from __future__ import annotations

import math
import types

import torch

from ds_finetune.dist import host_group, max_over_ranks
from ds_finetune.errors import UserError


def apply_tiled_mlp(model) -> int:
    """Route the dense MLP (`layer.mlp`, a `*MLP` module) of every decoder layer of `model` through TiledMLP;
    returns how many. A model with none (or a mixture-of-experts block, whose experts see a varying number
    of tokens a rank) is refused in one line."""
    mlps = [layer.mlp for layer in decoder_layers(model)]
    if not mlps or not all(type(m).__name__.endswith("MLP") for m in mlps):
        kinds = sorted({type(m).__name__ for m in mlps}) or ["no decoder layers found"]
        raise UserError(f"config error: train.tiled_mlp needs a dense MLP (a *MLP module) in every decoder layer; "
                        f"{type(model).__name__} has {', '.join(kinds)}; set train.tiled_mlp: false")
    agreed = {}  # the longest input of any rank in the model's current forward
    host_group()  # created now, where every rank builds the model, not in a forward hook

    def agree_on_length(module, args, kwargs):  # input_ids [batch, tokens] or inputs_embeds [batch, tokens, h]
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        if kwargs.get("use_cache"):
            # Generation (GRPO's rollout, under WholeForGeneration): a rank runs as many forwards as its own
            # completions need, with the weights whole, so no tile gathers anything; an agreement here would
            # be a collective that ranks done sooner never join.
            agreed["tokens"] = inputs.shape[1]
            return
        agreed["tokens"] = max_over_ranks(inputs.shape[1])

    model.register_forward_pre_hook(agree_on_length, with_kwargs=True)
    for mlp in mlps:
        mlp.forward = types.MethodType(tiled_forward(type(mlp).forward, agreed), mlp)
    return len(mlps)


def decoder_layers(model) -> list:
    """The modules that hold a `.mlp`: the decoder layers of a transformers causal LM (also under peft)."""
    return [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]


def tiled_forward(untiled, agreed: dict):
    """The MLP's forward in tiles, computing each tile with the class's own (untiled) forward; `agreed`:
    {"tokens": the longest input of any rank in the model's current forward}."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def compute(mlp, x):
        return untiled(mlp, x)

    def forward(self, x):
        tokens, hidden = x.shape[-2], x.shape[-1]
        # Each tile is a ZeRO-3 gather, a collective, so every rank runs as many tiles: a shorter input is
        # padded to the longest. With ceil(length / hidden) tiles torch.chunk, inside TiledMLP, makes exactly
        # that many, which its gradient bookkeeping counts on.
        longest = agreed["tokens"]
        if tokens > longest:  # a model whose layers see other tokens than its input: ranks could disagree
            raise RuntimeError(f"train.tiled_mlp: an MLP sees {tokens} tokens, the model's input has {longest}")
        if longest > tokens:  # zero rows whose outputs are dropped: no gradient comes back through them
            x = torch.nn.functional.pad(x, (0, 0, 0, longest - tokens))
        # Every parameter of the MLP (LoRA adapters included): TiledMLP tells ZeRO that their gradients are
        # complete only after the last tile, so a bucket never takes a partial sum.
        out = TiledMLP.apply(compute, self, x, math.ceil(longest / hidden), list(self.parameters()))
        return out[..., :tokens, :]
    return forward
