"""GRPO (train.objective: grpo): its math against TRL 1.16's GRPOTrainer (the anchor: the same prompts,
completions, rewards and weights give the same advantages, loss, gradients and metrics to 1e-5, for every
loss_type, beta 0 and > 0, num_iterations 2 with clipping active), a learning run on the tiny model, bad
input, and in real runs its kill-and-resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import harness
from ds_finetune.config import load_config
from ds_finetune.data import epoch_order, load_tokenizer, prepare_training_data
from ds_finetune.errors import UserError
from ds_finetune.objectives import ObjectiveParts, build_objective, grpo
from ds_finetune.sampler import BatchLayout
from ds_finetune.sequence import SequenceGroup
from ds_finetune.state import TrainState

TOKENIZER = harness.ROOT / "assets" / "tiny-tokenizer"
PROMPTS = [{"prompt": f"add {i} and {i + 2}", "answer": str(2 * i + 2)} for i in range(12)]
# A reward the tiny model can learn and that varies among a group's completions: the share of its tokens with
# an id below 128 (a quarter of the vocabulary).
REWARD_MODULE = ("def low_ids(prompts, completions, completion_ids, **columns):\n"
                 "    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]\n\n"
                 "def length(prompts, completions, completion_ids, answer, **columns):\n"
                 "    return [None if a == '4' else len(c) / 10 for c, a in zip(completions, answer)]\n")


class TinyEngine:
    """What the GRPO step uses of a DeepSpeed engine, in this process: a call, `.module`, `.device`, backward
    divided by grad_accum (as DeepSpeed), step (AdamW at the accumulation boundary), no ZeRO-3."""
    seq_dp_world_size, sequence_parallel_size, global_rank = 1, 1, 0

    def __init__(self, module, grad_accum: int = 1, lr: float = 1e-2):
        self.module, self.grad_accum, self.micro, self.device = module, grad_accum, 0, torch.device("cpu")
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr) if lr else None

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def fp16_enabled(self):
        return False

    def zero_optimization_stage(self):
        return 0

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.grad_accum == 0

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        if self.optimizer is not None and self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro += 1


def _folder(tmp_path: Path, rows=PROMPTS) -> Path:
    harness.write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "tiny_rewards.py").write_text(REWARD_MODULE)
    return tmp_path


def _config(tmp_path: Path, *overrides: str):
    return load_config(harness.TINY, [
        f"output_dir={tmp_path / 'out'}", "train.objective=grpo", "data.format=prompt",
        f"data.path={tmp_path / 'prompts.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
        "rewards=[{function: 'tiny_rewards:low_ids'}]", "grpo.num_generations=4", "grpo.max_completion_length=6",
        "train.micro_batch_size=2", "train.grad_accum=1", "model.config.attention_dropout=0.0", *overrides])


def _objective(tmp_path: Path, cfg, model, grad_accum: int = 1, lr: float = 1e-2):
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    data = prepare_training_data(cfg.data, tok)
    engine = TinyEngine(model, grad_accum, lr)
    layout = BatchLayout(cfg.train.micro_batch_size, grad_accum, 1)
    parts = ObjectiveParts(cfg, engine, model, {}, data, None, layout, tok.pad_token_id, 0, 1,
                           SequenceGroup.of(cfg, 1, 0), None, True, lambda msg: None, tok, tmp_path)
    return build_objective(parts), engine, data, layout


# -------------------------------------------------------------------------------------- against TRL

def _tiny_folder(tmp_path: Path, seed: int = 3, eos_boost: float = 14.0) -> Path:
    """The tiny model nudged off its init (so that rewards and ratios vary) and its eos logit raised by about
    `eos_boost` (so that some completions end before the length limit), saved as a pretrained folder."""
    model = harness.tiny_model("model.config.attention_dropout=0.0")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        hidden = model.model(torch.randint(3, 512, (4, 16), generator=g)).last_hidden_state.reshape(-1, 64).mean(0)
        model.lm_head.weight[model.config.eos_token_id] += eos_boost * hidden / hidden.square().sum()
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _nudge(*models, seed: int = 11, scale: float = 0.2) -> None:
    """The same step away on every model: the policy after an update, for num_iterations' later steps."""
    for model in models:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())


def _trl_trainer(tmp_path, folder, rewards, weights, settings: dict):
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from datasets import Dataset
    from trl import GRPOConfig
    tok = load_tokenizer(str(TOKENIZER))
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=8, logging_steps=1, dataloader_num_workers=0,
                      reward_weights=weights, **settings)
    trainer = grpo.GRPOTrainer(model=str(folder), reward_funcs=rewards, args=args, processing_class=tok,
                               train_dataset=Dataset.from_list(PROMPTS))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


SETTINGS = [  # (our grpo overrides, TRL's GRPOConfig arguments)
    *[({"loss_type": t}, {"loss_type": t}) for t in ("grpo", "dr_grpo", "dapo", "bnpo")],
    ({"loss_type": "dapo", "beta": 0.1}, {"loss_type": "dapo", "beta": 0.1}),
    ({"loss_type": "grpo", "beta": 0.05, "scale_rewards": "batch"}, {"loss_type": "grpo", "beta": 0.05,
                                                                     "scale_rewards": "batch"}),
    ({"loss_type": "bnpo", "num_iterations": 2, "epsilon": 0.02, "epsilon_high": 0.03},
     {"loss_type": "bnpo", "num_iterations": 2, "epsilon": 0.02, "epsilon_high": 0.03}),
    ({"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "beta": 0.1, "scale_rewards": "none",
      "mask_truncated_completions": True, "temperature": 1.3},
     {"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "beta": 0.1, "scale_rewards": "none",
      "mask_truncated_completions": True, "temperature": 1.3}),
    ({"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "temperature": 1.3},
     {"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "temperature": 1.3}),
    ({"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "mask_truncated_completions": True},
     {"loss_type": "dapo", "num_iterations": 2, "epsilon": 0.02, "mask_truncated_completions": True}),
    ({"loss_type": "dapo", "beta": 0.1, "temperature": 1.3},
     {"loss_type": "dapo", "beta": 0.1, "temperature": 1.3}),
    ({"loss_type": "dapo", "beta": 0.1, "num_iterations": 2},
     {"loss_type": "dapo", "beta": 0.1, "num_iterations": 2}),
    ({"loss_type": "dapo", "scale_rewards": "none", "num_iterations": 2},
     {"loss_type": "dapo", "scale_rewards": "none", "num_iterations": 2}),
    ({"loss_type": "grpo", "beta": 0.1, "num_iterations": 2, "use_bias_correction_kl": False},
     {"loss_type": "grpo", "beta": 0.1, "num_iterations": 2, "use_bias_correction_kl": False}),
]


def _frozen_copy(folder: Path, temperature: float):
    """grpo.frozen_reference's reference without its DeepSpeed engine (no process group in this process)."""
    from transformers import AutoModelForCausalLM

    from ds_finetune.loss import make_token_logps_fn
    base = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    logps_fn = make_token_logps_fn(base, 256)

    def reference(engine, input_ids, attention_mask, labels, facts):
        with torch.no_grad():
            return logps_fn(TinyEngine(base, lr=0), input_ids, attention_mask, labels, facts, temperature=temperature)
    return reference


@pytest.mark.parametrize("ours, theirs", SETTINGS)
def test_grpo_advantages_loss_gradients_and_metrics_equal_trl_grpo_trainer(tmp_path, monkeypatch, ours, theirs):
    """Our step's rollout (2 prompts x G=4, sampled by our loop) handed to TRL's _generate_and_score_completions
    in place of its generation; TRL's _compute_loss and our loss on the same weights (after a shared nudge of
    both models where num_iterations is 2, so the ratio moves and clipping is active): advantages, loss, every
    gradient and every metric of the issue to 1e-5."""
    folder = _tiny_folder(_folder(tmp_path))
    cfg = _config(tmp_path, "model.config=null", f"model.name_or_path={folder}", f"model.tokenizer={TOKENIZER}",
                  "grpo.max_completion_length=6", "rewards=[{function: 'tiny_rewards:low_ids'}, "
                  "{function: 'tiny_rewards:length', weight: 0.5}]", *(f"grpo.{k}={v}" for k, v in ours.items()))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    monkeypatch.setattr(grpo, "frozen_reference", lambda cfg, ds_config, temperature: _frozen_copy(folder, temperature))
    objective, engine, data, layout = _objective(tmp_path, cfg, model, lr=0)
    units = epoch_order(cfg, data).batch(TrainState(), layout.global_batch).units
    sampled = []
    generate = objective.rollout.generate
    objective.rollout.generate = lambda *a, **k: sampled.append(generate(*a, **k)) or sampled[-1]
    gen = objective.generation = objective.roll_out(engine, units, 1)  # the step below uses it
    completions = sampled[0]

    import importlib
    import sys
    sys.path.insert(0, str(tmp_path))
    rewards_module = importlib.import_module("tiny_rewards")
    sys.path.remove(str(tmp_path))
    trainer = _trl_trainer(tmp_path, folder, [rewards_module.low_ids, rewards_module.length], [1.0, 0.5],
                           {"num_generations": 4, "max_completion_length": 6, **theirs})
    inputs = [dict(data.row_columns(int(u[0]))) for u in units for _ in range(4)]
    ours_prompt_ids = [list(data.row(int(u[0]))[0]) for u in units for _ in range(4)]
    assert trainer._tokenize_prompts([x["prompt"] for x in inputs])[0] == ours_prompt_ids  # TRL tokenizes alike
    trainer._generate_single_turn = lambda *args, **kwargs: (completions, None)
    out = trainer._generate_and_score_completions(inputs)
    torch.testing.assert_close(gen.batches[0].advantages, out["advantages"].float(), atol=1e-5, rtol=1e-5)
    assert out["advantages"].abs().sum() > 0

    if theirs.get("beta"):
        torch.testing.assert_close(gen.batches[0].ref_logps, out["ref_per_token_logps"][out["completion_mask"].bool()],
                                   atol=1e-5, rtol=1e-5)
    if theirs.get("num_iterations", 1) > 1:
        torch.testing.assert_close(gen.batches[0].old_logps, out["old_per_token_logps"][out["completion_mask"].bool()],
                                   atol=1e-5, rtol=1e-5)
        _nudge(model, trainer.model)
    theirs_loss = trainer._compute_loss(trainer.model, out)
    theirs_loss.backward()
    result = objective.step(engine, units, 1)
    assert float(result.loss_sum) / result.normaliser == pytest.approx(theirs_loss.item(), abs=1e-5)

    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    names = ["reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio", "completions/mean_terminated_length",
             *(f"rewards/{n}/{s}" for n in ("low_ids", "length") for s in ("mean", "std"))]
    names += ["kl"] if theirs.get("beta") else []
    assert 0 < metrics["completions/clipped_ratio"] < 1  # some completions end at eos, some at the limit
    for name in names:
        assert result.counts[name] == pytest.approx(metrics[name], abs=1e-5, nan_ok=True), name
    if theirs.get("num_iterations", 1) > 1:
        assert metrics["clip_ratio/region_mean"] > 0  # clipping is active
    assert {"time/generate", "time/reward", "time/update"} <= set(result.counts)

    theirs_grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[n], atol=1e-5, rtol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------- learning

def test_grpo_learns_a_reward_the_tiny_model_can_learn(tmp_path):
    """20 steps of 4 prompts x G=8 completions of 8 tokens, in this process: the share of low-id tokens (the
    reward) rises by at least 0.2 from steps 1-5 to steps 16-20."""
    cfg = _config(_folder(tmp_path), "grpo.num_generations=8", "grpo.max_completion_length=8")
    torch.manual_seed(0)
    model = harness.tiny_model("model.config.attention_dropout=0.0")
    objective, engine, data, layout = _objective(tmp_path, cfg, model, grad_accum=2, lr=1e-2)
    order, state, rewards = epoch_order(cfg, data), TrainState(), []
    for step in range(1, 21):
        batch = order.batch(state, layout.global_batch)
        rewards.append(objective.step(engine, batch.units, step).counts["reward"])
        state.advance(batch.position, layout.global_batch, 0)
    assert np.mean(rewards[15:]) >= np.mean(rewards[:5]) + 0.2, rewards
    lines = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [s for s in range(1, 21) for _ in range(4 * 8)]
    assert lines[-1]["prompt"] in {r["prompt"] for r in PROMPTS} and "low_ids" in lines[-1]["rewards"]


def test_a_reward_model_folder_scores_prompt_and_completion_as_trl_does(tmp_path):
    """rewards: [{function: model:PATH}] (a sequence classifier with one label, as `ckpt export` writes for a
    reward run): strings scored as prompt + completion, messages through the chat template, each equal to
    the classifier's logit on that text alone (no padding, no special tokens added), in eval mode; named by
    its folder. Not a model folder, or one with two labels: one line each."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ds_finetune.objective_config import RewardFunctionConfig
    from ds_finetune.objectives.rewards import build_rewards, score

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = load_config(harness.TINY, ["output_dir=x"])
    folder = tmp_path / "rm"
    config = {**cfg.model.config, "num_labels": 1, "pad_token_id": tok.pad_token_id or tok.eos_token_id,
              "hidden_dropout": 0.1, "attention_dropout": 0.1}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rewards = build_rewards([RewardFunctionConfig(function="model:rm")], tmp_path)
    assert rewards[0].name == "rm"
    prompts = ["add 2 and 3 ", "add 2 and 3 ", "hi"]
    completions = ["5", "it is five, I think", "hello there"]
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    model.eval()

    def alone(text: str) -> float:
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    got = score(rewards, prompts, completions, [[1]] * 3, [{}] * 3, ["r"] * 3)
    assert [r[0] for r in got] == pytest.approx([alone(p + c) for p, c in zip(prompts, completions)], abs=1e-5)
    got = score(rewards, chat_prompts, chat_completions, [[1]] * 3, [{}] * 3, ["r"] * 3)
    rendered = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(chat_prompts, chat_completions)]
    assert [r[0] for r in got] == pytest.approx([alone(t) for t in rendered], abs=1e-5)
    assert len({round(r[0], 6) for r in got}) == 3
    with pytest.raises(UserError, match=r"model:nowhere is not a model folder \(no config.json there\)"):
        build_rewards([RewardFunctionConfig(function="model:nowhere")], tmp_path)
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**{**config, "num_labels": 2})).save_pretrained(
        tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="has 2 labels; a reward model has one"):
        build_rewards([RewardFunctionConfig(function="model:two")], tmp_path)


# ------------------------------------------------------------------------------------------ bad input

BAD_REWARDS = {
    "raises": ("def f(prompts, completions, answer, **kw):\n"
               "    return [1 / (int(a) - 8) for a in answer]\n",
               r"reward 'f' raised ZeroDivisionError: division by zero \(prompt .*prompts.jsonl:4\)"),
    "count": ("def f(prompts, completions, **kw):\n    return [1.0]\n",
              r"reward 'f' returned 1 rewards for 8 completions"),
    "nan": ("def f(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
            r"reward 'f' returned nan for the completion of prompt .*prompts.jsonl:\d+; return a finite float"),
    "text": ("def f(prompts, completions, **kw):\n    return ['1'] * len(completions)\n",
             r"reward 'f' returned str '1' for the completion of prompt .*prompts.jsonl:\d+; return a float"),
}


@pytest.mark.parametrize("case", sorted(BAD_REWARDS))
def test_a_bad_reward_function_is_one_line_naming_it_and_the_prompt(tmp_path, case):
    code, message = BAD_REWARDS[case]
    rows = [{"prompt": f"add {i} and {i + 2}", "answer": str(i + 5)} for i in range(12)]  # row 4's answer is 8
    _folder(tmp_path, rows)
    (tmp_path / f"bad_reward_{case}.py").write_text(code)  # a name of its own: imported modules stay cached
    cfg = _config(tmp_path, f"rewards=[{{function: 'bad_reward_{case}:f'}}]", "train.seed=5")
    objective, engine, data, layout = _objective(tmp_path, cfg, harness.tiny_model(), lr=0)
    # the global batches of seed 5 that hold row 4 (dataset line 4): run the first of them
    order, state = epoch_order(cfg, data), TrainState()
    batch = order.batch(state, layout.global_batch)
    while case == "raises" and 3 not in batch.units[:, 0]:
        state.advance(batch.position, layout.global_batch, 0)
        batch = order.batch(state, layout.global_batch)
    with pytest.raises(UserError, match=message) as raised:
        objective.step(engine, batch.units, 1)
    assert "\n" not in raised.value.message and raised.value.message.startswith("reward error: ")


@pytest.mark.parametrize("overrides, message", [
    (["rewards=[{function: accurracy}]"], r"rewards\[0\] \(accurracy\): function 'accurracy' is no built-in "
                                          r"\(accuracy, format\)"),
    (["rewards=[{function: 'no_such_module:f'}]"], r"rewards\[0\] \(f\): cannot import module 'no_such_module' "
                                                   r"\(ModuleNotFoundError"),
    (["rewards=[{function: 'tiny_rewards:nothing'}]"], r"module 'tiny_rewards' has no attribute 'nothing'"),
])
def test_an_unknown_or_unimportable_reward_is_one_line(tmp_path, overrides, message):
    cfg = _config(_folder(tmp_path), *overrides)
    with pytest.raises(UserError, match=message) as raised:
        _objective(tmp_path, cfg, harness.tiny_model())
    assert "\n" not in raised.value.message


@pytest.mark.parametrize("overrides, message", [
    (["grpo.num_generations=1"], r"grpo.num_generations.*greater than or equal to 2"),
    (["train.objective=sft"], r"data.format prompt is for train.objective grpo"),
    (["train.objective=dpo"], r"train.objective dpo needs data.format preference \(got prompt\)"),
    (["data.format=chat"], r"train.objective grpo needs data.format prompt \(got chat\)"),
    (["rewards=[]"], r"train.objective grpo needs rewards"),
    (["rewards=[{function: format}, {function: format}]"], r"two rewards are named 'format'"),
    (["rewards=[{function: accuracy, pattern: x}]"], r"pattern is a setting of the format reward"),
    (["data.packing=true"], r"data.packing is not supported with train.objective grpo"),
])
def test_grpo_config_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as raised:
        _config(tmp_path, *overrides)
    assert "\n" not in raised.value.message


def test_prompt_rows_keep_their_columns_and_count_what_max_prompt_length_cut(tmp_path):
    """Format prompt: a string prompt tokenized as TRL does, a message list rendered with the generation
    prompt; every other column kept for the rewards; data.max_prompt_length keeps a prompt's end and counts
    the rows it cut; a mixture of prompt sources works."""
    rows = [{"prompt": "a short one", "answer": "1", "meta": {"k": [1, 2]}},
            {"prompt": [{"role": "user", "content": "word " * 40}], "answer": "2"}]
    harness.write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = _config(tmp_path, f"data.path={tmp_path / 'mixed.jsonl'}", "data.max_prompt_length=16")
    tok = load_tokenizer(str(TOKENIZER))
    data = prepare_training_data(cfg.data, tok)
    assert data.row_columns(0) == {"prompt": "a short one", "answer": "1", "meta": {"k": [1, 2]}}
    assert data.row_columns(1)["prompt"] == rows[1]["prompt"]
    assert list(data.row(0)[0]) == tok("a short one")["input_ids"]
    rendered = tok(tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert list(data.row(1)[0]) == rendered[-16:] and len(rendered) > 16
    assert data.truncated_pairs == 1
    mixture = _config(tmp_path, "data.path=null", f"data.sources=[{{path: {tmp_path / 'mixed.jsonl'}, weight: 1}}, "
                                                  f"{{path: {_folder(tmp_path) / 'prompts.jsonl'}, weight: 2}}]")
    mixed = prepare_training_data(mixture.data, tok)
    assert mixed.row_columns(2) == PROMPTS[0] and mixed.num_rows == 2 + len(PROMPTS)


def test_a_system_prompt_goes_before_every_prompt_rendered_with_the_generation_prompt(tmp_path):
    """data.system_prompt: a string prompt becomes [system, user] messages and a message list without a system
    message gets it first (one with its own keeps it), rendered with the chat template's generation prompt;
    the rewards get the prompt as the model saw it. Another format refuses the setting in one line."""
    system = {"role": "system", "content": "Answer in <answer> tags."}
    own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    rows = [{"prompt": "add 2 and 3", "answer": "5"}, {"prompt": [{"role": "user", "content": "x"}]}, {"prompt": own}]
    harness.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = _config(tmp_path, f"data.path={tmp_path / 'rows.jsonl'}", f"data.system_prompt={system['content']}")
    tok = load_tokenizer(str(TOKENIZER))
    data = prepare_training_data(cfg.data, tok)
    given = [[system, {"role": "user", "content": "add 2 and 3"}], [system, {"role": "user", "content": "x"}], own]
    for r, messages in enumerate(given):
        assert data.row_columns(r)["prompt"] == messages
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert list(data.row(r)[0]) == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError, match="data.system_prompt is a setting of data.format prompt"):
        load_config(harness.TINY, ["data.system_prompt=hello", "output_dir=x"])


def test_num_iterations_trains_each_global_batch_for_a_block_and_uses_every_prompt(tmp_path):
    """num_iterations 3 (TRL's RepeatSampler): the steps of a block take the same prompts, the position moves
    on at its last step only, an epoch is every prompt once (12 prompts, global batch 2: 6 blocks, 18 steps),
    and a state saved inside a block resumes to the block's prompts."""
    cfg = _config(_folder(tmp_path), "grpo.num_iterations=3", "train.epochs=1", "train.max_steps=null")
    data = prepare_training_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    order = epoch_order(cfg, data)
    assert order.total_steps(cfg.train, 2) == 18
    state, steps = TrainState(), []
    while (batch := order.batch(state, 2)) is not None:
        steps.append(batch.units[:, 0].tolist())
        state.advance(batch.position, 2 if batch.samples is None else batch.samples, 0)
        if state.step == 4:  # inside the second block
            saved = TrainState.from_manifest({"trainer_state": json.loads(json.dumps(state.to_manifest()))})
            assert order.batch(saved, 2).units[:, 0].tolist() == steps[-1] and saved.consumed_samples == 2
    assert len(steps) == 18 and state.consumed_samples == 12
    blocks = [steps[i:i + 3] for i in range(0, 18, 3)]
    assert all(b[0] == b[1] == b[2] for b in blocks)
    assert sorted(r for b in blocks for r in b[0]) == list(range(12))


def test_num_iterations_rollout_buffer_survives_a_checkpoint_bitwise(tmp_path):
    """num_iterations 2: the generation of step 1 saved as plain values (through JSON, as a converted copy's
    meta holds it) and restored into a fresh objective gives step 2 the same loss, metrics and gradients; a
    buffer of another layout is not taken, and step 2 is then refused in one line."""
    cfg = _config(_folder(tmp_path), "grpo.num_iterations=2", "grpo.beta=0.0")
    model = harness.tiny_model("model.config.attention_dropout=0.0")
    first, engine, data, layout = _objective(tmp_path, cfg, model, lr=0)
    units = epoch_order(cfg, data).batch(TrainState(), layout.global_batch).units
    first.step(engine, units, 1)
    saved = json.loads(json.dumps(first.checkpoint_state()))
    model.zero_grad()
    expected = first.step(engine, units, 2)
    grads = [p.grad.clone() for p in model.parameters()]
    second, engine2, _, _ = _objective(tmp_path, cfg, model, lr=0)
    second.restore_checkpoint_state(saved)
    model.zero_grad()
    got = second.step(engine2, units, 2)
    assert float(got.loss_sum) == float(expected.loss_sum) and got.normaliser == expected.normaliser
    assert {k: v for k, v in got.counts.items() if not k.startswith("time/")} == \
        {k: v for k, v in expected.counts.items() if not k.startswith("time/")}
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    third, engine3, _, _ = _objective(tmp_path, cfg, model, lr=0)
    third.restore_checkpoint_state({**saved, "layout": [2, 0, 1, 1, 4]})
    with pytest.raises(UserError, match=r"step 2 reuses the completions of step 1 \(grpo.num_iterations=2\)"):
        third.step(engine3, units, 2)


# ------------------------------------------------------------------------------------------ real runs

GRPO_RUN = ["train.objective=grpo", "data.format=prompt", f"data.path={harness.ROOT / 'data' / 'tiny' / 'prompts.jsonl'}",
            "rewards=[{function: 'grpo_rewards:low_ids'}, {function: 'grpo_rewards:fails_while_flagged', "
            "weight: 0.5}]", "grpo.num_generations=4", "grpo.max_completion_length=8", "grpo.num_iterations=2",
            "grpo.epsilon_high=0.28", "train.max_steps=8", "train.micro_batch_size=1", "train.lr=1e-2"]
ENV = {"PYTHONPATH": f"{harness.ROOT}:{harness.ROOT / 'tests' / 'scripts'}"}


def _completions(out: Path) -> list[str]:
    return (out / "completions.jsonl").read_text().splitlines()


def _assert_same_grpo_run(got: Path, ref: Path) -> None:
    """Bitwise: losses, every metric but the times, completions.jsonl (one line per completion, no step
    twice), final weights."""
    harness.assert_same_run(got, ref)
    strip = (lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows])
    assert strip(harness.metrics(got)) == strip(harness.metrics(ref))
    assert _completions(got) == _completions(ref)
    harness.assert_same_final_weights(got, ref)


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    return harness.save_tiny_model(tmp_path_factory.mktemp("grpo-base") / "model", seed=7)


@pytest.mark.multiproc
@pytest.mark.parametrize("stage, lora, background", [(2, True, False), (3, False, True)])
def test_grpo_sigkill_at_a_random_instant_resumes_bitwise(tmp_path, lora_base, stage, lora, background):
    """Two ranks, dropout on, num_iterations 2 (a kill inside a block resumes from the saved rollouts), ZeRO-2
    with LoRA and ZeRO-3 full fine-tuning with background saves (each setting once): the job SIGKILLed from
    outside at a random instant after step 3 (in generation, a reward, the update or a save), resumed: the
    uninterrupted run's losses, rewards, metrics, completions.jsonl and final weights, bitwise. KILL_SEED=N
    replays an instant."""
    import os
    import random
    import shutil
    import time
    extra = [*GRPO_RUN, f"train.zero_stage={stage}", f"checkpoint.async_save={str(background).lower()}"]
    if lora:
        extra += ["model.config=null", f"model.name_or_path={lora_base}", "model.lora.r=4", "model.lora.alpha=8"]
    ref = tmp_path / "ref"
    harness.train(ref, extra, env=ENV)
    got = tmp_path / "got"
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    draw = random.Random(seed)
    for _ in range(5):
        delay = draw.uniform(0.0, 1.5)
        proc = harness.start(harness.train_argv(got, extra), ENV, log=tmp_path / "killed.log")
        assert harness.wait_for(lambda: len(harness.metrics(got)) >= 3, timeout=300), f"KILL_SEED={seed}"
        time.sleep(delay)
        harness.kill_job(proc)
        if harness.committed_steps(got / "checkpoints"):
            break
        shutil.rmtree(got)
    else:
        raise AssertionError(f"KILL_SEED={seed}: 5 kills, none after the first commit")
    steps_done = len(harness.read_jsonl(got / "metrics.jsonl", strict=False))
    assert steps_done < 8, f"the run finished before the kill (KILL_SEED={seed}); nothing was tested"
    step = harness.assert_resumed(harness.train(got, extra, resume="auto", env=ENV))
    assert step <= steps_done
    try:
        _assert_same_grpo_run(got, ref)
    except AssertionError as e:
        raise AssertionError(f"KILL_SEED={seed} (delay {delay:.3f} s, resumed at step {step}): {e}") from e
    assert len({r["reward"] for r in harness.metrics(ref)}) > 1 and harness.metrics(ref)[-1]["loss"] != 0


@pytest.mark.multiproc
def test_grpo_reward_error_then_kill_in_a_reward_then_zero3_to_zero2_resume(tmp_path):
    """ZeRO-3, two ranks. (1) The reward function raises on a prompt at step 3: one line naming it and the
    prompt's FILE:LINE, non-zero exit, the checkpoints of steps 1-2 intact. (2) Fixed (its flag removed),
    --resume continues, and a SIGKILL inside a reward function of step 5 (rank 1) kills the job. (3) Resumed
    under ZeRO-2 (the ZeRO-3 checkpoint of step 4 converted): the uninterrupted ZeRO-3 run's losses within
    1e-5, the same samples, and completions.jsonl with every step once."""
    extra = [*GRPO_RUN, "train.zero_stage=3"]
    row, answer = _first_row_of_step(3, extra)
    flag = tmp_path / "flag"
    env = {**ENV, "GRPO_REWARD_FLAG": str(flag), "GRPO_REWARD_ANSWER": answer}
    ref = tmp_path / "ref"
    harness.train(ref, extra, env=env)
    got = tmp_path / "got"
    flag.write_text("on")
    failed = harness.train(got, extra, env=env, expect_ok=False)
    harness.assert_one_line_error(failed, f"reward 'fails_while_flagged' raised ValueError: cannot score answer "
                                          f"{answer} (prompt ", f"prompts.jsonl:{row + 1})", "--resume")
    assert harness.committed_steps(got / "checkpoints") == [1, 2]  # keep_last 2: the last commit is intact
    flag.unlink()
    killed = harness.train(got, extra, resume="auto", env=env, fault="in_reward:rank1@step5", expect_ok=False)
    harness.assert_resumed(killed, step=2)
    assert harness.committed_steps(got / "checkpoints")[-1] == 4
    resumed = harness.train(got, [*GRPO_RUN, "train.zero_stage=2"], resume="auto", env=env)
    harness.assert_resumed(resumed, step=4)
    assert "convert" in resumed.stdout + resumed.stderr
    _assert_close_grpo_run(got, ref)
    lines, ref_lines = _completions(got), _completions(ref)
    # num_iterations 2: steps 1, 3, 5, 7 sample (4 prompts x 4 completions each), every one once
    assert [json.loads(x)["step"] for x in lines] == [s for s in (1, 3, 5, 7) for _ in range(16)]
    assert lines[:2 * 16] == ref_lines[:2 * 16]  # steps 1-4 at ZeRO-3 (failed, resumed, killed): bitwise


def _assert_close_grpo_run(got: Path, ref: Path, tol: float = 1e-5) -> None:
    """Across ZeRO stages: the same steps and samples, losses and rewards within `tol` (absolute: a GRPO loss
    is near 0 by construction, its advantages summing to 0 in every group, so a relative bound means nothing)."""
    rows, ref_rows = harness.metrics(got), harness.metrics(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert [r["sample_ids"] for r in rows] == [r["sample_ids"] for r in ref_rows]
    for a, b in zip(ref_rows, rows):
        for key in ("loss", "reward", "entropy"):
            assert b[key] == pytest.approx(a[key], abs=tol), (a["step"], key, a[key], b[key])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)


def _first_row_of_step(step: int, overrides) -> tuple[int, str]:
    """(dataset row, answer) of the first prompt of a run's step `step` (its global batch of 4 prompts)."""
    cfg = load_config(harness.TINY, [*harness.BASE, *overrides, "output_dir=unused"])
    data = prepare_training_data(cfg.data, load_tokenizer(cfg.model.tokenizer))
    order, state = epoch_order(cfg, data), TrainState()
    for _ in range(step - 1):
        state.advance(order.batch(state, 4).position, 4, 0)
    first = int(order.batch(state, 4).units[0][0])
    return int(data.row_ids[first]), data.row_columns(first)["answer"]
