"""Chat masks for templates that are not prefix-stable: the template's {% generation %} masks when it has
them, else `data.chat_turns: last` (one row per assistant turn, as the model sees it at inference), else a
one-line refusal naming that option. The templates here are written for the tests, each with a feature of a
common family: reasoning dropped from earlier turns (Qwen3-like), a default system prompt (Llama/Qwen2-like),
generation tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness

from ds_finetune import data
from ds_finetune.config import load_config
from ds_finetune.data_config import DataConfig
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.data.chat import span_mask, tagged_spans
from ds_finetune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "tiny-tokenizer"
TINY = REPO / "data" / "tiny"

# Qwen3-like: an assistant turn before the last user message loses its reasoning (`<think>...</think>`).
_QWEN3_TURN = ("{%- if loop.index0 < ns.last_user and '</think>' in content %}"
               "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}")
_QWEN3_HEAD = ("{%- set ns = namespace(last_user=-1) %}"
               "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
               "{%- endif %}{%- endfor %}"
               "{%- for m in messages %}{%- set content = m['content'] %}")
_QWEN3_TAIL = "{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
QWEN3_LIKE = (_QWEN3_HEAD + "{%- if m['role'] == 'assistant' %}" + _QWEN3_TURN + "{%- endif %}"
              "{{ '<|' + m['role'] + '|>\\n' + content + '<|end|>\\n' }}" + _QWEN3_TAIL)
# The same with generation tags; the newline after the end marker is inside them (layout, not reply).
QWEN3_TAGGED = (_QWEN3_HEAD + "{%- if m['role'] == 'assistant' %}" + _QWEN3_TURN +
                "{{ '<|assistant|>\\n' }}{% generation %}{{ content + '<|end|>\\n' }}{% endgeneration %}"
                "{%- else %}{{ '<|' + m['role'] + '|>\\n' + content + '<|end|>\\n' }}{%- endif %}" + _QWEN3_TAIL)
# Llama/Qwen2-like: a system prompt of its own when the conversation has none.
DEFAULT_SYSTEM = ("{%- if messages[0]['role'] != 'system' %}{{ '<|system|>\\nYou are helpful.<|end|>\\n' }}{%- endif %}"
                  "{%- for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endfor %}"
                  "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}")
# The shipped template with generation tags: prefix-stable, renders the same text.
SHIPPED_TAGGED = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m['role'] == 'assistant' %}"
                  "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{% else %}"
                  "{{ m['content'] + '<|end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

REASONING = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>r1</think>A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>r2</think>A2"}]


def tokenizer(template: str | None = None):
    tok = data.load_tokenizer(str(TOKENIZER))
    if template is not None:
        tok.chat_template = template
    return tok


def prepare(tok, tmp_path: Path, conversations: list, **settings) -> data.TokenizedData:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return data.prepare_data(DataConfig(path=str(src), format="chat", max_length=4096, cache_dir=str(tmp_path),
                                        **settings), tok)


def rows(tok, d: data.TokenizedData) -> list[tuple[str, list[str]]]:
    """(decoded text, decoded target runs) of every row."""
    out = []
    for i in range(d.num_rows):
        ids, mask = d.row(i)
        runs = harness.target_runs(ids.tolist(), mask.tolist())
        out.append((tok.decode(ids.tolist()), [tok.decode(r) for r in runs]))
    return out


def test_a_template_that_drops_reasoning_is_refused_in_one_line_naming_chat_turns(tmp_path):
    with pytest.raises(UserError) as info:
        prepare(tokenizer(QWEN3_LIKE), tmp_path, [REASONING])
    message = info.value.message
    assert message.startswith("data error: ") and "\n" not in message
    assert "cannot be located" in message and "data.chat_turns: last" in message and "{% generation %}" in message


def test_generation_tags_give_the_masks_of_a_template_that_drops_reasoning(tmp_path):
    tok = tokenizer(QWEN3_TAGGED)
    d = prepare(tok, tmp_path, [REASONING])
    assert rows(tok, d) == [(
        "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n<think>r2</think>A2<|end|>\n",
        ["A1<|end|>", "<think>r2</think>A2<|end|>"])]


def test_chat_turns_last_gives_one_row_per_turn_as_seen_at_inference(tmp_path):
    tok = tokenizer(QWEN3_LIKE)
    other = [{"role": "user", "content": "hi"}]  # no reply: skipped
    d = prepare(tok, tmp_path, [REASONING, other], chat_turns="last")
    assert d.row_ids.tolist() == [0, 0] and d.skipped_rows == 1
    first = "<|user|>\nQ1<|end|>\n<|assistant|>\n"
    assert rows(tok, d) == [
        (first + "<think>r1</think>A1<|end|>\n", ["<think>r1</think>A1<|end|>"]),
        (first + "A1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n<think>r2</think>A2<|end|>\n",
         ["<think>r2</think>A2<|end|>"])]


def test_chat_turns_last_keeps_a_default_system_prompt_in_every_row(tmp_path):
    tok = tokenizer(DEFAULT_SYSTEM)
    conversation = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "Say blue."}, {"role": "assistant", "content": "blue"}]
    d = prepare(tok, tmp_path, [conversation], chat_turns="last")
    system = "<|system|>\nYou are helpful.<|end|>\n<|user|>\nSay red.<|end|>\n<|assistant|>\n"
    assert rows(tok, d) == [(system + "red<|end|>\n", ["red<|end|>"]),
                            (system + "red<|end|>\n<|user|>\nSay blue.<|end|>\n<|assistant|>\nblue<|end|>\n",
                             ["blue<|end|>"])]


def test_generation_tags_mask_what_the_markers_mask_where_both_work(tmp_path):
    tok, tagged = tokenizer(), tokenizer(SHIPPED_TAGGED)
    d = data.prepare_data(DataConfig(path=str(TINY / "chat.jsonl"), format="chat", max_length=4096,
                                     cache_dir=str(tmp_path)), tok)
    conversations = [json.loads(line)["messages"] for line in (TINY / "chat.jsonl").read_text().splitlines()]
    for i, messages in enumerate(conversations[:100]):
        text, spans = tagged_spans(tagged, messages)
        encoding = tagged.backend_tokenizer.encode(text, add_special_tokens=False)
        ids, mask = encoding.ids, span_mask(text, encoding, len(encoding.ids), spans)
        mask[0] = False  # a row's first token is never a target (the cache's invariant)
        expected_ids, expected_mask = d.row(i)
        assert ids == expected_ids.tolist()
        assert mask.tolist() == expected_mask.tolist(), i


def reasoning_cache_inputs(tmp_path):
    """(data config, tokenizer, content hash) of a one-conversation file: what the cache key is made of."""
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": REASONING}) + "\n")
    cfg = DataConfig(path=str(src), format="chat", cache_dir=str(tmp_path))
    return cfg, tokenizer(), data.content_hash(data.resolve_data_files(cfg.path), cfg.path, cfg.split)


def test_chat_turns_is_in_the_cache_key_and_the_fingerprint(tmp_path):
    cfg, tok, h = reasoning_cache_inputs(tmp_path)
    assert data.cache_path(cfg, h, tok) != data.cache_path(cfg.model_copy(update={"chat_turns": "last"}), h, tok)

    tiny = REPO / "configs" / "tiny.yaml"
    saved = config_fingerprint(load_config(tiny), 8, "a" * 64)
    assert changed_exact_keys(saved, config_fingerprint(load_config(tiny, ["data.chat_turns=last"]), 8, "a" * 64)) \
        == ["data.chat_turns"]
    # A checkpoint saved before the key existed (no chat_turns recorded) resumes at the default.
    assert "chat_turns" not in saved["exact"]["data"]


def test_a_cache_key_from_before_chat_turns_is_unchanged_at_the_default(tmp_path):
    """The key as the version without data.chat_turns computed it: the same data keeps its cache."""
    import hashlib
    cfg, tok, h = reasoning_cache_inputs(tmp_path)
    added = {"chat_turns", "sources", "chosen_field", "rejected_field", "max_prompt_length",  # keys added since
             "layout", "chat_template", "subset", "revision", "data_files", "label_field", "margin_field",
             "system_prompt"}
    before = {k: v for k, v in cfg.model_dump(mode="json", exclude=data.cache.NOT_IN_KEY).items() if k not in added}
    key = json.dumps({"v": data.DATA_FORMAT_VERSION, "data": h, "tok": data.tokenizer_fingerprint(tok), **before},
                     sort_keys=True)
    assert data.cache_path(cfg, h, tok).name == hashlib.sha256(key.encode()).hexdigest()[:32]
