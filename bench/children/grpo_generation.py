"""What the two sides of `bench/grpo.py` share, and ours' child: a clock on the generation call (one JSON line a
call) and the end-of-sequence token kept from being sampled, so both sides generate every completion to
grpo.max_completion_length and a step's work does not depend on where a random model happens to sample eos.

  ours   ds-finetune's GRPO rollout (objectives/rollout.py, SamplingRollout): `generate` timed, and its eos ids'
         logits set to -inf before it samples (TRL's way below, applied to the logits it samples from)
  TRL    GRPOTrainer's `_generate_single_turn` (padding, transformers' generate, eos masking) timed, and
         `generation_kwargs={"suppress_tokens": eos ids}` (transformers' SuppressTokensLogitsProcessor)

A line: {"start", "end" (time.time()), "completions", "tokens" (generated), "prompt_tokens"}.

    python bench/children/grpo_generation.py GEN.jsonl --config RUN.yaml [overrides...]   (ours: ds_finetune.train.main)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)


class GenerationLog:
    def __init__(self, path: str):
        self.file = open(path, "a")

    def timed(self, generate, count):
        """`generate` with each call written; count(args, kwargs, result) -> (completions, tokens, prompt tokens)."""
        def call(*args, **kwargs):
            start = time.time()
            result = generate(*args, **kwargs)
            end = time.time()
            completions, tokens, prompt_tokens = count(args, kwargs, result)
            self.file.write(json.dumps({"start": start, "end": end, "completions": completions, "tokens": tokens,
                                        "prompt_tokens": prompt_tokens}) + "\n")
            self.file.flush()
            return result
        return call


def patch_ours(log: GenerationLog) -> None:
    """ds-finetune's SamplingRollout: generate timed, eos never sampled."""
    import torch

    from ds_finetune.objectives.rollout import SamplingRollout

    sample = SamplingRollout.sample

    def sample_without_eos(self, logits, generator):
        eos = torch.tensor(self.eos_ids, device=logits.device)
        return sample(self, logits.index_fill(-1, eos, -float("inf")), generator)

    def count(args, kwargs, result):  # generate(self, engine, prompts, generator, ...)
        prompts = args[2] if len(args) > 2 else kwargs["prompts"]
        return len(result), sum(map(len, result)), sum(map(len, prompts))

    SamplingRollout.sample = sample_without_eos
    SamplingRollout.generate = log.timed(SamplingRollout.generate, count)


def main() -> None:
    from ds_finetune import train
    patch_ours(GenerationLog(sys.argv[1]))
    train.main(sys.argv[2:])


if __name__ == "__main__":
    main()
