"""GRPO's rollouts: completions sampled from the policy's current weights, behind a small interface
(`Rollout`) so that another engine (vLLM, on GPUs) can take its place.

`SamplingRollout` is transformers' sampling written out: a forward over the left-padded prompts that fills
the KV cache, then one token a step for the whole batch (position ids from the attention mask, as
`generate` numbers them), the logits in fp32 through transformers' warpers in its order (temperature,
top-k, top-p) and `torch.multinomial` with the rollout's own generator. Why not `generate` itself: it draws
from the global RNG (its multinomial takes no generator), so a resumed step would sample from whatever
state the global RNG is in; forking and reseeding the global RNG around it would work on one device type
but ties exactness to the order in which transformers and its processors draw, which is theirs to change.
Here every draw is one multinomial call on a generator that lives on the engine's device and is seeded
from (seed, step, rank, micro-batch) (`rollout_generator`), nothing else: a resumed step draws the same
completions, and the global RNG (dropout's) is untouched.

The model runs in eval mode (no dropout) under no_grad, with LoRA's adapters on (the policy is what
samples). Under ZeRO-3 every parameter is gathered on the rank and DeepSpeed's fetch hooks are off for the
duration (`ds_internals.WholeForGeneration`, as TRL's unwrap_model_for_generation): each rank runs as many
forwards as its own completions need, with no collective inside.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Protocol

import numpy as np
import torch

from ds_finetune.dist import frozen_eval
from ds_finetune.ds_internals import WholeForGeneration


class Rollout(Protocol):
    eos_ids: list[int]  # the tokens that end a completion

    def generate(self, engine, prompts: list[np.ndarray], generator: torch.Generator) -> list[list[int]]:
        """One completion for each prompt (token ids; the eos it stopped at included, none where it ran to
        the length limit), sampled from the engine's current weights with `generator`'s draws only."""


def rollout_generator(device, seed: int, step: int, rank: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's rollout, on `device`, seeded from (seed, step, rank, micro-batch)."""
    key = hashlib.sha256(f"grpo-rollout/{seed}/{step}/{rank}/{micro_batch}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


class SamplingRollout:
    def __init__(self, temperature: float, top_p: float, top_k: int, max_new_tokens: int, eos_ids: list[int],
                 pad_id: int):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.pad_id = max_new_tokens, pad_id
        self.eos_ids = list(eos_ids)

    def generate(self, engine, prompts: list[np.ndarray], generator: torch.Generator) -> list[list[int]]:
        device, model = engine.device, engine.module
        ids, mask = left_padded(prompts, self.pad_id, device)
        eos = torch.tensor(self.eos_ids, device=device)
        tokens = []
        with frozen_eval(model), WholeForGeneration(engine):
            cache = {cache_argument(model): new_cache(model)}  # filled in place by every forward
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                        **cache)
            finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
            for t in range(self.max_new_tokens):
                token = self.sample(out.logits[:, -1, :], generator)
                token = torch.where(finished, torch.full_like(token, self.pad_id), token)
                tokens.append(token)
                finished |= torch.isin(token, eos)
                if t + 1 == self.max_new_tokens or bool(finished.all()):  # a host sync a token, as generate's
                    break
                mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], 1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                            **cache)
        return completions_of(torch.stack(tokens, 1).cpu().numpy(), self.eos_ids)

    def sample(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token a row: transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (in
        that order, each skipped at its neutral value), softmax, multinomial."""
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k > 0:
            k = min(self.top_k, scores.size(-1))
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
        if self.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - self.top_p)
            remove[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(_hf(model).forward).parameters else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=_hf(model).config)


def left_padded(prompts: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest (as TRL pads them), and their attention mask, on `device`."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def completions_of(sampled: np.ndarray, eos_ids: list[int]) -> list[list[int]]:
    """Each row's tokens up to and including its first eos (all of them where none)."""
    out = []
    for row in sampled:
        stops = np.flatnonzero(np.isin(row, eos_ids))
        out.append([int(x) for x in (row[:stops[0] + 1] if len(stops) else row)])
    return out
