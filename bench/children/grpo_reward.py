"""The reward of `bench/grpo.py`, the same function on both sides: TRL's GRPOTrainer gets it as a reward_funcs
callable, ds-finetune as `rewards: [{function: grpo_reward:known_token_share}]` (this folder is on the Python
path of both children, which run as scripts from it).

Cheap pure Python, so the step is generation and training: the share of a completion's tokens that the
tokenizer knows (ids below KNOWN, the shipped tokenizer's 512). The bench's model has a 32,000-token
vocabulary, so a random model samples ~1.6 % of them and the G completions of a prompt differ in reward
(the advantages are not all zero, as with a text reward on completions that mostly decode to nothing).
"""

KNOWN = 512


def known_token_share(prompts, completions, completion_ids, **columns):
    return [sum(t < KNOWN for t in ids) / max(len(ids), 1) for ids in completion_ids]
