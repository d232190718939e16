"""Layouts: the shapes rows of one format come in, detected from each row's columns (or forced with
`data.layout`), and rewritten into the one shape the format's code reads (formats.py, preference.py).

    chat               messages (OpenAI: role/content, content a string or a list of parts, tool_calls,
                       the tool role) | sharegpt (conversations of from/value) | alpaca (instruction,
                       input, output, system)                     -> {messages_field: [{role, content, ...}]}
    prompt_completion  strings | conversational (TRL: prompt and completion as message lists)
                                                                  -> {prompt_field, completion_field}
    preference         explicit_prompt (a prompt column: a string or messages; chosen/rejected strings or
                       messages) | implicit_prompt (TRL: chosen/rejected whole conversations whose shared
                       start is the prompt)                       -> {prompt_field, chosen_field, rejected_field}
                       both kinds, as strings or all message lists, as preference.py reads them
    prompt             prompt (a string or messages; format prompt, every other column kept) -> as is
    unpaired_preference  strings | conversational, as prompt_completion (and a label column, formats.py)
    text               text (only)

Detection takes the first layout, in the order above, whose columns the row has; so the format's first
layout (the one it always read) keeps its own error messages. A row that fits none is a one-line error
naming its file:line, the column missing and the columns it has.
"""

from __future__ import annotations

import json

from ds_finetune.data_config import LAYOUTS
from ds_finetune.errors import UserError

SHAREGPT_COLUMN = "conversations"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system", "tool": "tool", "observation": "tool"}
# What each format reads, said in the refusal of a row that fits none of its layouts.
READS = {"chat": "messages (a list of {role, content}), conversations (ShareGPT: a list of {from, value}) or "
                 "instruction/input/output (alpaca)",
         "prompt_completion": "prompt and completion, strings or message lists",
         "preference": "prompt, chosen and rejected (strings or message lists), or chosen and rejected "
                       "conversations that share their prompt",
         "prompt": "prompt (a string or a message list) and any other columns",
         "unpaired_preference": "prompt, completion (strings or message lists) and label (true or false)"}


def normalise_rows(cfg, rows: list[dict], ats: list[str]) -> list[dict]:
    """Each row in the shape the format's code reads (see the module docstring)."""
    if cfg.format == "text":
        return rows
    return [normalise_row(cfg, row, at) for row, at in zip(rows, ats)]


def normalise_row(cfg, row: dict, at: str) -> dict:
    layout = cfg.layout if cfg.layout != "auto" else detect_layout(cfg, row)
    if layout is None or not fits(cfg, layout, row):
        raise UserError(no_layout_message(cfg, row, at, layout))
    return NORMALISE[layout](cfg, row, at)


# ---------------------------------------------------------------------------------------------- detect

def detect_layout(cfg, row: dict) -> str | None:
    return next((name for name in LAYOUTS[cfg.format] if fits(cfg, name, row)), None)


def fits(cfg, layout: str, row: dict) -> bool:
    """Whether the row has the columns that make `layout` (their types are checked when it is read)."""
    has = (lambda *names: all(row.get(n) is not None for n in names))
    if layout == "messages":
        return has(cfg.messages_field) and not _sharegpt_turns(row.get(cfg.messages_field))
    if layout == "sharegpt":
        return _sharegpt_column(cfg, row) is not None
    if layout == "alpaca":
        return has("instruction", "output")
    if layout in ("strings", "conversational"):
        conversational = isinstance(row.get(cfg.prompt_field), list)
        return has(cfg.prompt_field, cfg.completion_field) and conversational == (layout == "conversational")
    if layout == "explicit_prompt":
        return has(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    if layout == "implicit_prompt":
        return has(cfg.chosen_field, cfg.rejected_field)
    if layout == "prompt":
        return has(cfg.prompt_field)
    return layout == "text"


def _sharegpt_turns(value) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and "from" in m for m in value)


def _sharegpt_column(cfg, row: dict) -> str | None:
    for name in (cfg.messages_field, SHAREGPT_COLUMN):
        if _sharegpt_turns(row.get(name)):
            return name
    return None


def no_layout_message(cfg, row: dict, at: str, layout: str | None) -> str:
    """One line: the column the format's first layout (or the forced one) misses, and the columns found."""
    wanted = {"chat": [cfg.messages_field], "prompt_completion": [cfg.prompt_field, cfg.completion_field],
              "preference": [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field],
              "prompt": [cfg.prompt_field],
              "unpaired_preference": [cfg.prompt_field, cfg.completion_field]}[cfg.format]
    if layout == "implicit_prompt":
        wanted = wanted[1:]
    missing = next((n for n in wanted if row.get(n) is None), wanted[0])
    setting = {cfg.messages_field: "messages_field", cfg.prompt_field: "prompt_field",
               cfg.completion_field: "completion_field", cfg.chosen_field: "chosen_field",
               cfg.rejected_field: "rejected_field"}[missing]
    found = ", ".join(map(str, row)) or "none"
    forced = f"data.layout {layout} does not fit it" if layout else f"no {cfg.format} layout fits it"
    return (f"data error: {at}: field {missing!r} is missing and {forced} (columns found: {found}); format "
            f"{cfg.format} reads {READS[cfg.format]}; set data.{setting} if the column has another name, or "
            f"data.layout")


# --------------------------------------------------------------------------------------------- messages

def clean_messages(messages, at: str):
    """OpenAI-style messages as templates take them: keys without a value dropped (Arrow gives every message
    every key any message has, None where absent, and templates test `is defined`), list-of-parts content
    joined, a tool call's JSON-string arguments parsed (templates write them with `tojson`, as transformers
    documents), no content beside tool calls read as empty. Anything else is left for check_messages."""
    if not isinstance(messages, list):
        return messages
    return [_clean_message(m, at, j) if isinstance(m, dict) else m for j, m in enumerate(messages)]


def _clean_message(message: dict, at: str, j: int) -> dict:
    m = {k: v for k, v in message.items() if v is not None}
    if isinstance(m.get("content"), list):
        m["content"] = join_text_parts(m["content"], at, j)
    if m.get("tool_calls"):
        m.setdefault("content", "")
        m["tool_calls"] = [_parsed_arguments(call) for call in m["tool_calls"]]
    return m


def join_text_parts(parts: list, at: str, j: int) -> str:
    """The text of list-of-parts content, parts joined by newlines (as vLLM joins them for text models)."""
    texts = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
        kind = part.get("type", "text") if isinstance(part, dict) else "text"
        if kind != "text" or not isinstance(text, str):
            raise UserError(f"data error: {at}, message {j + 1}: a content part of type {kind!r} without a "
                            f"string 'text'; only text parts can be trained on (remove the others)")
        texts.append(text)
    return "\n".join(texts)


def _parsed_arguments(call):
    """A tool call {type, function: {name, arguments}} or {name, arguments}, None-valued keys dropped."""
    if not isinstance(call, dict):
        return call
    call = {k: v for k, v in call.items() if v is not None}
    if isinstance(call.get("function"), dict):
        return {**call, "function": _parsed_arguments(call["function"])}
    if isinstance(call.get("arguments"), str):
        try:
            return {**call, "arguments": json.loads(call["arguments"])}
        except ValueError:
            return call  # not JSON: the template writes the string as it is
    return call


# -------------------------------------------------------------------------------------------------- chat

def _messages(cfg, row: dict, at: str) -> dict:
    return {cfg.messages_field: clean_messages(row[cfg.messages_field], at)}


def _sharegpt(cfg, row: dict, at: str) -> dict:
    turns = row[_sharegpt_column(cfg, row)]
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    for j, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise UserError(f"data error: {at}, turn {j + 1}: ShareGPT 'from' {speaker!r} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}; fix the row or convert it to OpenAI messages")
        value = turn.get("value")
        if not isinstance(value, str):
            raise UserError(f"data error: {at}, turn {j + 1}: ShareGPT 'value' is missing or not a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return {cfg.messages_field: messages}


def _alpaca(cfg, row: dict, at: str) -> dict:
    """system? / user: the instruction, then the input after an empty line when there is one / assistant."""
    for name in ("instruction", "input", "output", "system"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise UserError(f"data error: {at}: alpaca field {name!r} is not a string")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return {cfg.messages_field: system + [{"role": "user", "content": user},
                                          {"role": "assistant", "content": row["output"]}]}


# ------------------------------------------------------------------------------------ prompt_completion

def _strings(cfg, row: dict, at: str) -> dict:
    return {name: _string(row, name, at, cfg.format, setting)
            for name, setting in ((cfg.prompt_field, "prompt_field"), (cfg.completion_field, "completion_field"))}


def _string(row: dict, name: str, at: str, fmt: str, setting: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        what = "missing" if value is None else "not a str"
        raise UserError(f"data error: {at}: field {name!r} is {what} (format {fmt} needs it; set data.{setting} "
                        f"if the column has another name)")
    return value


def _conversational(cfg, row: dict, at: str) -> dict:
    prompt, completion = row[cfg.prompt_field], row[cfg.completion_field]
    if not isinstance(completion, list):
        raise UserError(f"data error: {at}: field {cfg.completion_field!r} is not a list of messages (a "
                        f"conversational prompt needs its completion as messages too)")
    return {cfg.prompt_field: clean_messages(prompt, at), cfg.completion_field: clean_messages(completion, at)}


# ------------------------------------------------------------------------------------------- preference

def _explicit_prompt(cfg, row: dict, at: str) -> dict:
    prompt, chosen, rejected = (row[cfg.prompt_field], row[cfg.chosen_field], row[cfg.rejected_field])
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        # ultrafeedback_binarized: a string prompt beside conversations that repeat it as their first turn.
        # As TRL's maybe_extract_prompt: the conversations' shared start is the prompt; where they share
        # nothing, they are the answers to the prompt as a user turn.
        shared, chosen, rejected = split_shared_start(clean_messages(chosen, at), clean_messages(rejected, at))
        prompt = shared or [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = ([{"role": "assistant", "content": c}] for c in (chosen, rejected))
    return _pair(cfg, prompt, chosen, rejected, at)


def _implicit_prompt(cfg, row: dict, at: str) -> dict:
    """TRL's extract_prompt: the longest shared start of chosen and rejected is the prompt."""
    chosen, rejected = row[cfg.chosen_field], row[cfg.rejected_field]
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = clean_messages(chosen, at), clean_messages(rejected, at)
    elif not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise UserError(f"data error: {at}: fields {cfg.chosen_field!r} and {cfg.rejected_field!r} must both be "
                        f"conversations (message lists) or both strings (format preference without a prompt "
                        f"column)")
    return _pair(cfg, *split_shared_start(chosen, rejected), at)


def split_shared_start(chosen, rejected):
    """(shared start, chosen's rest, rejected's rest) of two message lists or strings, as TRL's
    extract_prompt splits them: a string prompt gives up a space it ends with to the completions."""
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _pair(cfg, prompt, chosen, rejected, at: str) -> dict:
    return {cfg.prompt_field: clean_messages(prompt, at), cfg.chosen_field: chosen, cfg.rejected_field: rejected}


NORMALISE = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "strings": _strings,
             "conversational": _conversational, "explicit_prompt": _explicit_prompt,
             "implicit_prompt": _implicit_prompt, "text": lambda cfg, row, at: row,
             "prompt": lambda cfg, row, at: row}
