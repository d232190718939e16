"""GRPO's reward functions (`rewards:` in the run config): built-ins and `module:callable`s, called as TRL's
GRPOTrainer calls them, `fn(prompts=, completions=, completion_ids=, **columns)` with one entry per
completion (a prompt repeated for each of its G completions), returning a float or None each (None: the
function does not apply to that completion; TRL's NaN). The reward of a completion is the weighted sum of
the functions' rewards, NaN ignored (TRL's nansum), NaN when every function returned None.

Rewards must be pure functions of (prompt, completion, columns): a resumed step calls them again on the
same completions and must get the same numbers (SPEC: exact resume).

Built-ins:
  accuracy  the completion's answer checked by the math-verify library against the row's `answer` column:
            the text inside <answer>...</answer> where the completion has one, else the whole completion,
            parsed as LaTeX or a plain expression; the gold answer is the column after GSM8K's `####` where
            it has one. 1.0 when they are equal, 0.0 when not, None when the gold answer does not parse.
  format    1.0 when the completion matches `pattern` in full (default <think>...</think><answer>...</answer>,
            as TRL's format examples), else 0.0.

A reward model: `function: model:PATH` names a sequence-classification folder with one label (what
`ds-finetune ckpt export` writes for a train.objective reward run; PATH relative to the config file's folder
or the working one). It scores prompt + completion as TRL's GRPOTrainer scores with a reward model: the
texts joined (conversational ones rendered with its tokenizer's chat template), right-padded, no special
tokens added, the logit of its one label; in eval mode under inference_mode on this rank's device.

A bad function is one line that names it: not importable, not callable, raising (with the prompt's data
row), returning a wrong count, NaN or a non-number.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Callable

from ds_finetune.errors import UserError

DEFAULT_FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
BUILT_INS = ("accuracy", "format")


@dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable
    weight: float


def build_rewards(cfgs: list, config_dir: Path | None, device=None) -> list[Reward]:
    """The run's reward functions, each built-in made, `module:callable` imported (from the config file's
    folder first, then the Python path) or `model:PATH` loaded onto `device` (default the CPU)."""
    return [Reward(c.name, _function(c, i, config_dir, device), c.weight) for i, c in enumerate(cfgs)]


def _function(cfg, i: int, config_dir: Path | None, device=None) -> Callable:
    where = f"rewards[{i}] ({cfg.name})"
    if cfg.function.startswith("model:"):
        return model_reward(cfg.function[len("model:"):], where, config_dir, device)
    if cfg.function == "accuracy":
        _check_math_verify()
        return accuracy_reward
    if cfg.function == "format":
        return format_reward(cfg.pattern or DEFAULT_FORMAT, where)
    if ":" not in cfg.function:
        raise UserError(f"config error: {where}: function {cfg.function!r} is no built-in ({', '.join(BUILT_INS)}) "
                        f"and not module:callable; use one of those")
    module_name, attr = cfg.function.rsplit(":", 1)
    added = config_dir is not None and str(config_dir) not in sys.path
    if added:
        sys.path.insert(0, str(config_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error of its import is theirs to fix
        raise UserError(f"config error: {where}: cannot import module {module_name!r} ({type(e).__name__}: "
                        f"{_short(e)}); put it beside the config file or on PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(str(config_dir))
    fn = getattr(module, attr, None)
    if not callable(fn):
        what = "has no attribute" if fn is None else "has a non-callable"
        raise UserError(f"config error: {where}: module {module_name!r} {what} {attr!r}; name a function "
                        f"(prompts, completions, **columns) -> list of float")
    return fn


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _check_math_verify() -> None:
    import importlib.util
    if importlib.util.find_spec("math_verify") is None:
        raise UserError("config error: the accuracy reward needs the math-verify library; pip install "
                        "'ds-finetune[grpo]' (or math-verify)")


# ---------------------------------------------------------------------------------------------- calling

def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: list[dict], rows: list[str], fault=None) -> list[list[float]]:
    """[completion][function] rewards (NaN for None), or a UserError naming the function and the row
    (`rows[k]`: completion k's prompt as FILE:ROW) that failed. `fault()` runs before each call (tests)."""
    keys = [k for k in columns[0] if k != "prompt"] if columns else []
    kwargs = {k: [c.get(k) for c in columns] for k in keys}
    out = [[math.nan] * len(rewards) for _ in completions]
    for j, reward in enumerate(rewards):
        if fault is not None:
            fault()
        values = _call(reward, prompts, completions, completion_ids, kwargs, rows)
        for k, value in enumerate(values):
            out[k][j] = value
    return out


def _call(reward: Reward, prompts, completions, completion_ids, kwargs, rows) -> list[float]:
    try:
        values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    except Exception as e:  # the user's function: name it and the prompt it failed on
        raise UserError(f"reward error: reward {reward.name!r} raised {type(e).__name__}: {_short(e)} (prompt "
                        f"{_failing_row(reward, prompts, completions, completion_ids, kwargs, rows)}); fix it and "
                        f"resume with --resume") from None
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"reward error: reward {reward.name!r} returned a {type(values).__name__}, not a list; "
                        f"return one float (or None) per completion") from None
    if len(values) != len(completions):
        raise UserError(f"reward error: reward {reward.name!r} returned {len(values)} rewards for {len(completions)} "
                        f"completions; return one float (or None) per completion")
    out = []
    for k, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, Real):
            raise UserError(f"reward error: reward {reward.name!r} returned {type(v).__name__} {_short(v)!r} for the "
                            f"completion of prompt {rows[k]}; return a float (or None) per completion")
        if not math.isfinite(float(v)):
            raise UserError(f"reward error: reward {reward.name!r} returned {float(v)} for the completion of prompt "
                            f"{rows[k]}; return a finite float (or None where it does not apply)")
        out.append(float(v))
    return out


def _failing_row(reward, prompts, completions, completion_ids, kwargs, rows) -> str:
    """The first prompt whose completion alone makes the function raise (called one by one); the first
    prompt where none does alone."""
    for k in range(len(completions)):
        try:
            reward.fn(prompts=prompts[k:k + 1], completions=completions[k:k + 1],
                      completion_ids=completion_ids[k:k + 1], **{n: v[k:k + 1] for n, v in kwargs.items()})
        except Exception:
            return rows[k]
    return rows[0]


# ---------------------------------------------------------------------------------------- reward models

def model_reward(path_text: str, where: str, config_dir: Path | None, device=None) -> Callable:
    """The reward function of a sequence-classification folder (see the module's doc)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path_text).expanduser()
    if not path.is_absolute() and config_dir is not None and (config_dir / path).exists():
        path = config_dir / path
    if not (path / "config.json").is_file():
        raise UserError(f"config error: {where}: model:{path_text} is not a model folder (no config.json there); "
                        f"name the folder `ds-finetune ckpt export` wrote for a train.objective reward run")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype="auto")
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a folder of the user's: whatever fails in loading it is theirs to fix
        raise UserError(f"config error: {where}: cannot load the reward model in {path} ({type(e).__name__}: "
                        f"{_short(e)})") from None
    if model.config.num_labels != 1:
        raise UserError(f"config error: {where}: the model in {path} has {model.config.num_labels} labels; a reward "
                        f"model has one (train.objective reward)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:  # the classifier scores each row's last token before the padding
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or "cpu").eval().requires_grad_(False)

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        if isinstance(prompts[0], list):  # messages: the template over the conversation, as TRL
            texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.inference_mode():
            return model(**inputs.to(model.device)).logits[:, 0].float().tolist()
    return reward_model


# --------------------------------------------------------------------------------------------- built-ins

def _text(completion) -> str:
    """A completion's text: a string, or TRL's conversational [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def format_reward(pattern: str, where: str) -> Callable:
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UserError(f"config error: {where}: pattern is not a regular expression ({e})") from None

    def format(completions, **kwargs) -> list[float]:
        return [1.0 if regex.fullmatch(_text(c).strip()) else 0.0 for c in completions]
    return format


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def accuracy_reward(completions, answer=None, **kwargs) -> list[float | None]:
    if answer is None:
        raise KeyError("the accuracy reward reads the `answer` column, which the data does not have (map it there)")
    from math_verify import parse, verify

    out = []
    for completion, gold in zip(completions, answer, strict=True):
        gold = str(gold).split("####")[-1].strip()
        gold_parsed = parse(gold)
        if not gold_parsed:
            out.append(None)
            continue
        text = _text(completion)
        tagged = _ANSWER.search(text)
        out.append(float(verify(gold_parsed, parse(tagged.group(1) if tagged else text))))
    return out
