"""Reward functions of the GRPO tests' real runs (tests/test_grpo.py puts this folder on PYTHONPATH): pure
functions of (prompt, completion, columns), called as TRL calls them."""

import os


def low_ids(prompts, completions, completion_ids, **columns):
    """The share of a completion's tokens with an id below 128: varies within a group, learnable."""
    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]


def fails_while_flagged(prompts, completions, answer, **columns):
    """Raises on the prompts whose answer is GRPO_REWARD_ANSWER while the file named by GRPO_REWARD_FLAG
    exists: a bug the user then fixes (removes the flag) before --resume. 0 otherwise."""
    flag, bad = os.environ.get("GRPO_REWARD_FLAG", ""), os.environ.get("GRPO_REWARD_ANSWER")
    if flag and os.path.exists(flag) and bad in answer:
        raise ValueError(f"cannot score answer {bad}")
    return [0.0] * len(completions)
