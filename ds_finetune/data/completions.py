"""Prompts and completions given as messages (TRL's conversational prompt/completion and preference
layouts), rendered to text with the chat template: the prompt with its generation prompt, a completion as
what the rendering of prompt + completion adds to it. The template writes its own bos and end-of-turn
text, so these rows get no bos or eos added (unlike string rows)."""

from __future__ import annotations

from ds_finetune.data.chat import ChatRenderer, check_messages
from ds_finetune.errors import UserError


def render_completions(renderer: ChatRenderer, prompt: list, completions: list[list], at: str) -> tuple[str, list[str]]:
    """(prompt text, each completion's text). Refused in one line when the template does not render the
    prompt as the start of prompt + completion (then a completion cannot be located)."""
    for messages in (prompt, *completions):
        check_messages(messages, at)
    render = renderer.for_conversation(prompt + completions[0])
    text = render(prompt, True)
    full = [render(prompt + c, False) for c in completions]
    if not all(f.startswith(text) for f in full):
        raise UserError(f"data error: {at}: the chat template does not render the prompt with its generation "
                        f"prompt as the start of prompt + completion; completions cannot be located")
    return text, [f[len(text):] for f in full]


def prompt_completion_texts(tok, cfg, rows: list[dict], ats: list[str]):
    """(prompts, completions, templated) of a chunk of format prompt_completion rows, as layouts.py leaves
    them: strings, or message lists rendered with the template (`templated` True: no bos/eos added)."""
    renderer, prompts, completions, templated = ChatRenderer(tok), [], [], []
    for row, at in zip(rows, ats):
        prompt, completion = row[cfg.prompt_field], row[cfg.completion_field]
        chat = isinstance(prompt, list)
        if chat:
            prompt, (completion,) = render_completions(renderer, prompt, [completion], at)
        prompts.append(prompt)
        completions.append(completion)
        templated.append(chat)
    return prompts, completions, templated
