"""Data comes in the layouts users bring: rows written as public datasets lay them out prepare
with only data.path and data.format set, and their targets are checked against the template's rendering
written out here by hand as pieces (text, is it a target): assistant replies (tool calls included) and
their end-of-turn text, and completions, are targets; everything else is not, and a row's first token
never is. A row that fits no layout is one line listing the columns it has.

The shipped tiny tokenizer's template renders a message as `<|role|>\\n{content}<|end|>\\n` and the
generation prompt as `<|assistant|>\\n`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ds_finetune import data
from ds_finetune.data.cache import DATA_FORMAT_VERSION, NOT_IN_KEY, cache_path, tokenizer_fingerprint
from ds_finetune.data_config import DataConfig
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import data_fingerprint
from harness import write_jsonl

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
F, T = False, True
SKY = "What color is the sky?"

# A template that writes tool calls (as tool-calling families do, here in one line per call).
TOOLS_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m.tool_calls is defined %}"
                  "{% for c in m.tool_calls %}{{ '<tool_call>' + c.function.name + ' ' }}{{ c.function.arguments "
                  "| tojson }}{{ '</tool_call>' }}{% endfor %}{% endif %}{{ m['content'] + '<|end|>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOKENIZER))


def prepare(tok, tmp_path: Path, rows: list[dict], fmt: str, name: str = "rows.jsonl", **settings):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return data.prepare_data(DataConfig(path=str(path), format=fmt, max_length=4096, cache_dir=str(tmp_path / "c"),
                                        **settings), tok)


def rendered(tok, pieces) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one rendering written as pieces: a token is a target if one of its characters is."""
    text = "".join(t for t, _ in pieces)
    encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    spans, pos = [], 0
    for piece, target in pieces:
        if target:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    mask = [any(a < e and b > s for s, e in spans) for a, b in encoding.offsets]
    return encoding.ids, [False] + mask[1:]


def tokenized_apart(tok, prompt: str, completion: str, bos_eos: bool) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a prompt and a completion tokenized apart: the completion (and an eos) the targets."""
    enc = (lambda s: tok.backend_tokenizer.encode(s, add_special_tokens=False).ids)
    p = ([tok.bos_token_id] if bos_eos else []) + enc(prompt)
    c = enc(completion) + ([tok.eos_token_id] if bos_eos else [])
    return p + c, [False] * len(p) + [True] * len(c)


def rows_of(d) -> list[tuple[list[int], list[bool]]]:
    return [(ids.tolist(), mask.tolist()) for ids, mask in (d.row(i) for i in range(d.num_rows))]


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------------------------- chat

ULTRACHAT = {"prompt": "Say red.", "prompt_id": "abc123", "messages": [
    turn("user", "Say red."), turn("assistant", "red red"), turn("user", "Say blue."), turn("assistant", "blue")]}
TWO_TURNS = [("<|user|>\nSay red.<|end|>\n<|assistant|>\n", F), ("red red<|end|>", T),
             ("\n<|user|>\nSay blue.<|end|>\n<|assistant|>\n", F), ("blue<|end|>", T), ("\n", F)]
SHAREGPT = {"id": "x1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say red."},
                                          {"from": "gpt", "value": "red red"}, {"from": "human", "value": "Say blue."},
                                          {"from": "gpt", "value": "blue"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5",
          "text": "Below is an instruction... ### Response: 5"}
PARTS = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say red."}, {"type": "text", "text": "Twice."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red red"}]}]}
TOOL_CALL = {"messages": [
    turn("user", "Weather in Paris?"),
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
    turn("assistant", "It is 22C in Paris.")]}

CHAT_CASES = {
    "ultrachat_200k (OpenAI messages beside prompt columns)": (ULTRACHAT, None, TWO_TURNS),
    "ShareGPT conversations": (SHAREGPT, None, [("<|system|>\nBe brief.<|end|>\n", F)] + TWO_TURNS),
    "alpaca": (ALPACA, None, [("<|user|>\nAdd the numbers.\n\n2 and 3<|end|>\n<|assistant|>\n", F), ("5<|end|>", T),
                              ("\n", F)]),
    "alpaca with system and empty input": (
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."}, None,
        [("<|system|>\nBe kind.<|end|>\n<|user|>\nSay hi.<|end|>\n<|assistant|>\n", F), ("hi<|end|>", T), ("\n", F)]),
    "list-of-parts content": (PARTS, None, [("<|user|>\nSay red.\nTwice.<|end|>\n<|assistant|>\n", F),
                                            ("red red<|end|>", T), ("\n", F)]),
    "tool calls and the tool role": (TOOL_CALL, TOOLS_TEMPLATE, [
        ("<|user|>\nWeather in Paris?<|end|>\n<|assistant|>\n", F),
        ('<tool_call>get_weather {"city": "Paris"}</tool_call><|end|>', T),
        ("\n<|tool|>\n22C<|end|>\n<|assistant|>\n", F), ("It is 22C in Paris.<|end|>", T), ("\n", F)]),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_layouts_prepare_with_only_path_and_format_and_target_the_replies(case, tok, tmp_path):
    row, template, pieces = CHAT_CASES[case]
    if template is not None:  # a tokenizer whose template writes tool calls
        tok = data.load_tokenizer(str(TOKENIZER), template)
    d = prepare(tok, tmp_path, [row], "chat")
    assert rows_of(d) == [rendered(tok, pieces)]


def test_tool_calls_from_parquet_where_every_message_has_every_key_prepare_the_same(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = data.load_tokenizer(str(TOKENIZER), TOOLS_TEMPLATE)
    pq.write_table(pa.Table.from_pylist([TOOL_CALL, ULTRACHAT]), tmp_path / "tools.parquet")
    # Arrow gives the user turn `tool_calls: None` and `tool_call_id: None`: the same as the JSONL rows.
    from_parquet = data.prepare_data(DataConfig(path=str(tmp_path / "tools.parquet"), format="chat", max_length=4096,
                                                cache_dir=str(tmp_path / "c")), tok)
    assert rows_of(from_parquet) == rows_of(prepare(tok, tmp_path, [TOOL_CALL, ULTRACHAT], "chat"))


# ------------------------------------------------------------------------------------ prompt_completion

def test_prompt_completion_strings_and_trl_conversational_rows(tok, tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."},
            {"prompt": [turn("user", SKY)], "completion": [turn("assistant", "It is blue.")]}]
    d = prepare(tok, tmp_path, rows, "prompt_completion")
    assert rows_of(d) == [tokenized_apart(tok, "The sky is", " blue.", bos_eos=True),
                          tokenized_apart(tok, f"<|user|>\n{SKY}<|end|>\n<|assistant|>\n", "It is blue.<|end|>\n",
                                          bos_eos=False)]


# ------------------------------------------------------------------------------------------- preference

ULTRAFEEDBACK = {"prompt": SKY, "prompt_id": "p1", "score_chosen": 8.0, "score_rejected": 2.0,
                 "chosen": [turn("user", SKY), turn("assistant", "It is blue.")],
                 "rejected": [turn("user", SKY), turn("assistant", "It is green.")],
                 "messages": [turn("user", SKY), turn("assistant", "It is blue.")]}
SKY_PROMPT = f"<|user|>\n{SKY}<|end|>\n<|assistant|>\n"
SKY_PAIR = [(SKY_PROMPT, "It is blue.<|end|>\n"), (SKY_PROMPT, "It is green.<|end|>\n")]

PREFERENCE_CASES = {
    "ultrafeedback_binarized (string prompt, conversations that repeat it)": ULTRAFEEDBACK,
    "TRL conversational with an explicit prompt": {"prompt": [turn("user", SKY)],
                                                   "chosen": [turn("assistant", "It is blue.")],
                                                   "rejected": [turn("assistant", "It is green.")]},
    "TRL implicit prompt (whole conversations)": {"chosen": [turn("user", SKY), turn("assistant", "It is blue.")],
                                                  "rejected": [turn("user", SKY), turn("assistant", "It is green.")]},
    "a string prompt beside answers that do not repeat it": {"prompt": SKY, "chosen": [turn("assistant", "It is blue.")],
                                                            "rejected": [turn("assistant", "It is green.")]},
    "messages prompt with string answers": {"prompt": [turn("user", SKY)], "chosen": "It is blue.",
                                            "rejected": "It is green."},
}


@pytest.mark.parametrize("case", list(PREFERENCE_CASES))
def test_preference_layouts_target_the_answers_only(case, tok, tmp_path):
    d = prepare(tok, tmp_path, [PREFERENCE_CASES[case]], "preference")
    assert rows_of(d) == [tokenized_apart(tok, p, c, bos_eos=False) for p, c in SKY_PAIR]


def test_implicit_prompt_strings_split_where_trl_splits_them(tok, tmp_path):
    # TRL's extract_prompt: the shared start, less the space it ends with, is the prompt.
    d = prepare(tok, tmp_path, [{"chosen": "The sky is blue.", "rejected": "The sky is green."}], "preference")
    assert rows_of(d) == [tokenized_apart(tok, "The sky is", " blue.", bos_eos=True),
                          tokenized_apart(tok, "The sky is", " green.", bos_eos=True)]


def test_the_same_pairs_in_every_layout_give_the_same_rows(tok, tmp_path):
    results = [rows_of(prepare(tok, tmp_path / str(i), [row], "preference"))
               for i, row in enumerate(PREFERENCE_CASES.values())]
    assert all(r == results[0] for r in results)


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("fmt, row, words", [
    ("chat", ULTRAFEEDBACK | {"messages": None}, ["'messages' is missing", "prompt, prompt_id", "chosen, rejected",
                                                  "data.messages_field", "data.layout"]),
    ("preference", ULTRACHAT, ["'chosen' is missing", "columns found: prompt, prompt_id, messages"]),
    ("prompt_completion", SHAREGPT, ["'prompt' is missing", "columns found: id, conversations"]),
    ("chat", {"question": "q", "answer": "a"}, ["no chat layout fits", "columns found: question, answer"]),
])
def test_a_row_that_fits_no_layout_is_one_line_listing_its_columns(fmt, row, words, tok, tmp_path):
    row = {k: v for k, v in row.items() if v is not None}
    with pytest.raises(UserError) as e:
        prepare(tok, tmp_path, [row], fmt)
    message = e.value.message
    assert "\n" not in message and message.startswith("data error: ") and "rows.jsonl:1" in message, message
    assert all(w in message for w in words), message


def test_a_forced_layout_is_used_and_refuses_rows_it_does_not_fit(tok, tmp_path):
    both = ULTRACHAT | {"conversations": SHAREGPT["conversations"]}
    sharegpt = prepare(tok, tmp_path / "a", [both], "chat", layout="sharegpt")
    assert rows_of(sharegpt) == [rendered(tok, [("<|system|>\nBe brief.<|end|>\n", F)] + TWO_TURNS)]
    with pytest.raises(UserError, match=r"data.layout alpaca does not fit it \(columns found: prompt, prompt_id, messages\)"):
        prepare(tok, tmp_path / "b", [ULTRACHAT], "chat", layout="alpaca")


def test_a_layout_of_another_format_is_a_config_error():
    with pytest.raises(ValueError, match="data.layout sharegpt is not a layout of format preference"):
        DataConfig(path="x.jsonl", format="preference", layout="sharegpt")


@pytest.mark.parametrize("turns, words", [
    ([{"from": "narrator", "value": "x"}], ["turn 1", "'narrator'", "human, user, gpt"]),
    ([{"from": "human", "value": 3}], ["turn 1", "'value'"]),
])
def test_a_bad_sharegpt_turn_is_one_line(turns, words, tok, tmp_path):
    with pytest.raises(UserError) as e:
        prepare(tok, tmp_path, [{"conversations": turns}], "chat")
    assert "\n" not in e.value.message and "rows.jsonl:1" in e.value.message
    assert all(w in e.value.message for w in words), e.value.message


def test_a_non_text_content_part_is_one_line(tok, tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}, turn("assistant", "a")]}
    with pytest.raises(UserError, match="rows.jsonl:1 .*message 1: a content part of type 'image'"):
        prepare(tok, tmp_path, [row], "chat")


# -------------------------------------------------------------------------------------- chat_template

UPPER = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end]\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
UPPER_PIECES = [("[user] Say red. [end]\n[assistant] ", F), ("red red [end]", T), ("\n[user] Say blue. [end]\n"
                "[assistant] ", F), ("blue [end]", T), ("\n", F)]


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_replaces_the_tokenizers_as_a_string_or_a_file(as_file, tok, tmp_path):
    value = UPPER
    if as_file:
        (tmp_path / "t.jinja").write_text(UPPER)
        value = str(tmp_path / "t.jinja")
    d = prepare(tok, tmp_path, [ULTRACHAT], "chat", chat_template=value)
    assert rows_of(d) == [rendered(tok, UPPER_PIECES)]
    assert data.load_tokenizer(str(TOKENIZER), value).chat_template == UPPER
    assert tok.chat_template != UPPER  # the caller's tokenizer keeps its own


def test_an_unreadable_chat_template_file_is_one_line(tok, tmp_path):
    with pytest.raises(UserError, match="data.chat_template: cannot read .*nope.jinja"):
        prepare(tok, tmp_path, [ULTRACHAT], "chat", chat_template=str(tmp_path / "nope.jinja"))


# ------------------------------------------------------------------------------- cache key, fingerprint

def key_before_layouts(cfg: DataConfig, data_hash: str, tok) -> str:
    """The cache key as it was computed before layouts existed (its settings had none of the new keys)."""
    new = {"layout", "chat_template", "subset", "revision", "data_files", "label_field", "margin_field",
           "system_prompt"}
    settings = {k: v for k, v in cfg.model_dump(mode="json", exclude=NOT_IN_KEY | new).items()
                if (k, v) not in {("chat_turns", "all"), ("sources", None), ("chosen_field", "chosen"),
                                  ("rejected_field", "rejected"), ("max_prompt_length", None)}}
    key = json.dumps({"v": DATA_FORMAT_VERSION, "data": data_hash, "tok": tokenizer_fingerprint(tok), **settings},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def test_default_layout_keeps_existing_cache_keys_and_fingerprints(tok, tmp_path):
    for fmt in ("text", "chat", "prompt_completion", "preference"):
        cfg = DataConfig(path="x.jsonl", format=fmt, cache_dir=str(tmp_path))
        assert cache_path(cfg, "h", tok).name == key_before_layouts(cfg, "h", tok)
        assert not {"layout", "chat_template", "subset", "revision", "data_files"} & set(data_fingerprint(cfg))


def test_layout_and_chat_template_are_in_the_cache_key_and_the_fingerprint(tok, tmp_path):
    (tmp_path / "t.jinja").write_text(UPPER)
    base = DataConfig(path="x.jsonl", format="chat", cache_dir=str(tmp_path))
    variants = [base.model_copy(update=u) for u in ({"layout": "sharegpt"}, {"chat_template": UPPER},
                                                    {"chat_template": str(tmp_path / "t.jinja")})]
    keys = {cache_path(c, "h", tok) for c in [base] + variants}
    assert len(keys) == 3  # the template as a string or as a file is the same template
    prints = [data_fingerprint(c) for c in [base] + variants]
    assert prints[1]["layout"] == "sharegpt" and prints[2]["chat_template"] == prints[3]["chat_template"] != UPPER
    (tmp_path / "t.jinja").write_text(UPPER + " ")  # an edited file is a changed setting
    assert data_fingerprint(variants[2])["chat_template"] != prints[3]["chat_template"]
    assert cache_path(variants[2], "h", tok) != cache_path(variants[1], "h", tok)
