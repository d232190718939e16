"""TRL's GRPOTrainer, the contender of `bench/grpo.py`, in one process on the CPU.

It reads a ds-finetune GRPO run config so both sides do the same work: the same inline model (built from the
same seed), the same prompts file (both sides tokenize a string prompt as `tokenizer(text)`), the same
prompts a micro-step (TRL's per_device_train_batch_size counts completions: micro_batch_size x G), grad
accumulation, optimizer (torch AdamW), LR schedule, clipping, G, max_completion_length, temperature, top_p,
top_k, loss_type, scale_rewards, epsilon, beta, num_iterations, mask_truncated_completions, and the reward
function (bench/children/grpo_reward.py). fp32 without gradient checkpointing (GRPOConfig defaults to bf16
and checkpointing; ds-finetune's run uses neither), generation by transformers' `generate` (use_vllm False).
The eos token is suppressed and the generation call timed (bench/children/grpo_generation.py).

Appends one JSON line per optimizer step to --steps-log: {"step", "loss", "time"} (time at the step's end, as
ds-finetune's metrics.jsonl), and one a generation call to --generations.

    python bench/children/grpo_trl.py --config RUN.yaml --out DIR --steps-log steps.jsonl --generations gen.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (this is bench/children/)
from grpo_generation import GenerationLog  # noqa: E402
from grpo_reward import known_token_share  # noqa: E402
from side_by_side import loss_log, random_model, trainer_settings  # noqa: E402  (this folder's: HF Trainer's child)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="ds-finetune GRPO run config to mirror")
    p.add_argument("--out", required=True, help="Trainer output_dir")
    p.add_argument("--steps-log", required=True, help="per-step JSONL")
    p.add_argument("--generations", required=True, help="JSONL, one line a generation call")
    return p.parse_args()


def grpo_args(cfg, out: str, eos_ids: list[int]):
    import trl
    micro, accum, _ = cfg.batch_layout(1)
    g = cfg.grpo
    return trl.GRPOConfig(
        output_dir=out, per_device_train_batch_size=micro * g.num_generations, gradient_accumulation_steps=accum,
        max_steps=cfg.train.max_steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        use_vllm=False, num_generations=g.num_generations,
        max_completion_length=g.max_completion_length, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        loss_type=g.loss_type, scale_rewards=g.scale_rewards, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
        beta=g.beta, num_iterations=g.num_iterations, mask_truncated_completions=g.mask_truncated_completions,
        generation_kwargs={"suppress_tokens": eos_ids}, **trainer_settings(cfg))


def main():
    args = parse_args()
    import trl
    from datasets import Dataset

    from ds_finetune.config import load_config
    from ds_finetune.data import load_tokenizer

    cfg = load_config(args.config, [])
    if [r.function for r in cfg.rewards] != ["grpo_reward:known_token_share"]:
        sys.exit(f"{args.config}: the bench's reward is grpo_reward:known_token_share, not {cfg.rewards}")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines() if line.strip()]
    model = random_model(cfg)
    eos_ids = sorted({tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[known_token_share], args=grpo_args(cfg, args.out, eos_ids),
                              processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                              callbacks=[loss_log(args.steps_log)()])

    def count(call_args, kwargs, result):  # _generate_single_turn(prompt_ids, ...) -> (completion_ids, logprobs)
        prompt_ids = call_args[0] if call_args else kwargs["prompt_ids"]
        return len(result[0]), sum(map(len, result[0])), sum(map(len, prompt_ids))

    trainer._generate_single_turn = GenerationLog(args.generations).timed(trainer._generate_single_turn, count)
    trainer.train()


if __name__ == "__main__":
    main()
