"""Chat masks on templates shaped like those model families ship, written here (nothing downloaded): a
generation prompt with whitespace the assistant turn lacks (leading, trailing, indentation), a default
system prompt, a template that trims or rewrites replies, one that drops earlier turns' reasoning.

Each case spells out the rendering by hand as pieces (text, is it a target): a reply's content and the
end-of-turn text after it are targets; headers, user and system text, and the whitespace a template puts
between turns are not. The expected mask is computed here from those pieces alone: a token is a target if
one of its characters is (docs/design.md, "Chat masks"), and a row's first token never is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ds_finetune import data
from ds_finetune.data_config import DataConfig
from ds_finetune.errors import UserError

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
EOS = "<|eos|>"  # the shipped tokenizer's eos
TWO_TURNS = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red red"},
             {"role": "user", "content": "Say blue."}, {"role": "assistant", "content": "blue"}]
REASONING = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>r1</think>A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>r2</think>A2"}]

# Vicuna-like: a default system prompt; the generation prompt starts with a space and ends with a newline
# where an assistant turn has a newline before its header and a space after it.
VICUNA = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
          "{% set loop_messages = messages[1:] %}{% else %}{% set system = 'A chat between a user and an "
          "assistant.' %}{% set loop_messages = messages %}{% endif %}{{ system }}\n"
          "{% for m in loop_messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
          "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %} ASSISTANT:\n{% endif %}")
# Gemma-like: written on several lines without whitespace control, so the generation prompt is indented
# and ends with an empty line; replies are trimmed.
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}\n    <start_of_turn>model\n\n{% endif %}")
# ChatQA-like: a default system prompt; the generation prompt has two newlines before its header.
CHATQA = ("{% if messages[0]['role'] != 'system' %}{{ 'System: This is a chat.\\n\\n' }}{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'system' %}{{ 'System: ' + m['content'] + '\\n\\n' }}"
          "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n\\n' }}"
          "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '\\n\\nAssistant:\\n' }}{% endif %}")
# Alpaca-like: whitespace on both sides of the generation prompt's header.
ALPACA = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
          "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '\\n### Response:\\n\\n' }}{% endif %}")
# Llama-3-like (worked before): a header ending in an empty line, trimmed replies.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n\\n' + m['content'] | trim }}"
          "{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n\\n' }}{% endif %}")
# Mistral-like (worked before): the assistant's header is the end of the user turn; no generation prompt.
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
# Qwen3-like: a reply's reasoning is dropped once a later user turn follows, and reformatted in the turns
# after the last user message (`<think>\n...\n</think>\n\n`); the generation prompt is indented.
_DROP = ("{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
         "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
         "{%- if m['role'] == 'assistant' %}{%- set content = m['content'] %}{%- set reasoning = '' %}"
         "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
         "{%- set content = content.split('</think>')[-1] %}{%- endif %}{{ '<|assistant|>\\n' }}")
_REPLY = ("{%- if loop.index0 > ns.last_user %}{{ '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{%- endif %}"
          "{{ content + '<|end|>\\n' }}")
_REST = ("{%- else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{ '  <|assistant|>\\n\\n' }}{%- endif %}")
DROPS_REASONING = _DROP + _REPLY + _REST
DROPS_REASONING_TAGGED = _DROP + "{% generation %}" + _REPLY + "{% endgeneration %}" + _REST
# Writes replies upper-cased: rewritten, but the same once later turns follow, so the generation prompt
# (here with whitespace the turn lacks) says where each starts.
SHOUTS = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + (m['content'] | upper if m['role'] == 'assistant' "
          "else m['content']) + '<|end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ ' <|assistant|>\\n' }}{% endif %}")
# DeepSeek-R1-like: drops every reply's reasoning, and its generation prompt opens a reasoning block that
# no rendered turn has: a reply with reasoning cannot be located, alone or not.
R1 = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'].split('</think>')[-1] "
      "+ '<|end|>' }}{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|assistant|><think>\\n' }}{% endif %}")

F, T = False, True
# name: (template (None: the shipped one), conversation (None: TWO_TURNS), pieces of its rendering (text, target)).
CASES = {
    "vicuna: generation prompt ' ASSISTANT:\\n', default system prompt": (VICUNA, None, [
        ("A chat between a user and an assistant.\nUSER: Say red.\nASSISTANT: ", F), ("red red" + EOS, T),
        ("\nUSER: Say blue.\nASSISTANT: ", F), ("blue" + EOS, T), ("\n", F)]),
    "vicuna: the conversation's own system prompt": (VICUNA, [{"role": "system", "content": "Be brief."}] + TWO_TURNS, [
        ("Be brief.\nUSER: Say red.\nASSISTANT: ", F), ("red red" + EOS, T), ("\nUSER: Say blue.\nASSISTANT: ", F),
        ("blue" + EOS, T), ("\n", F)]),
    "gemma: indented generation prompt '    <start_of_turn>model\\n\\n', trimmed replies": (GEMMA, [
        {"role": "user", "content": "Say red."}, {"role": "assistant", "content": "  red red\n"},
        {"role": "user", "content": "Say blue."}, {"role": "assistant", "content": "blue "}], [
        ("<|bos|><start_of_turn>user\nSay red.<end_of_turn>\n<start_of_turn>model\n", F),
        ("red red<end_of_turn>", T), ("\n<start_of_turn>user\nSay blue.<end_of_turn>\n<start_of_turn>model\n", F),
        ("blue<end_of_turn>", T), ("\n", F)]),
    "chatqa: generation prompt '\\n\\nAssistant:\\n', default system prompt": (CHATQA, None, [
        ("System: This is a chat.\n\nUser: Say red.\n\nAssistant: ", F), ("red red" + EOS, T),
        ("\n\nUser: Say blue.\n\nAssistant: ", F), ("blue" + EOS, T), ("\n\n", F)]),
    "alpaca: generation prompt '\\n### Response:\\n\\n'": (ALPACA, None, [
        ("### Instruction:\nSay red.\n### Response:\n", F), ("red red" + EOS, T),
        ("\n### Instruction:\nSay blue.\n### Response:\n", F), ("blue" + EOS, T), ("\n", F)]),
    "llama3: header with an empty line, trimmed replies": (LLAMA3, None, [
        ("<|bos|><|user|>\n\nSay red.<|end|><|assistant|>\n\n", F), ("red red<|end|>", T),
        ("<|user|>\n\nSay blue.<|end|><|assistant|>\n\n", F), ("blue<|end|>", T)]),
    "mistral: the header ends the user turn, no generation prompt": (MISTRAL, None, [
        ("<|bos|>[INST] Say red. [/INST]", F), ("red red" + EOS, T), ("[INST] Say blue. [/INST]", F),
        ("blue" + EOS, T)]),
    "drops reasoning: {% generation %} tags": (DROPS_REASONING_TAGGED, REASONING, [
        ("<|user|>\nQ1<|end|>\n<|assistant|>\n", F), ("A1<|end|>", T), ("\n<|user|>\nQ2<|end|>\n<|assistant|>\n", F),
        ("<think>\nr2\n</think>\n\nA2<|end|>", T), ("\n", F)]),
    "drops reasoning: one reply, its reasoning reformatted": (DROPS_REASONING, REASONING[:2], [
        ("<|user|>\nQ1<|end|>\n<|assistant|>\n", F), ("<think>\nr1\n</think>\n\nA1<|end|>", T), ("\n", F)]),
    "drops reasoning: earlier replies without reasoning": (DROPS_REASONING, [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>r2</think>A2"}], [
        ("<|user|>\nQ1<|end|>\n<|assistant|>\n", F), ("A1<|end|>", T), ("\n<|user|>\nQ2<|end|>\n<|assistant|>\n", F),
        ("<think>\nr2\n</think>\n\nA2<|end|>", T), ("\n", F)]),
    "a reply that opens the conversation (shipped template)": (None, [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Say red."},
        {"role": "assistant", "content": "red"}], [
        ("<|assistant|>\n", F), ("Hello.<|end|>", T), ("\n<|user|>\nSay red.<|end|>\n<|assistant|>\n", F),
        ("red<|end|>", T), ("\n", F)]),
}
# Rows of data.chat_turns: last (one per reply, trained on that reply only) for a template that drops
# reasoning: the earlier reply as the template renders history, the last one with its reasoning.
LAST_TURNS = [
    [("<|user|>\nQ1<|end|>\n<|assistant|>\n", F), ("<think>\nr1\n</think>\n\nA1<|end|>", T), ("\n", F)],
    [("<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n", F),
     ("<think>\nr2\n</think>\n\nA2<|end|>", T), ("\n", F)]]


def tokenizer(template: str | None):
    tok = data.load_tokenizer(str(TOKENIZER))
    if template is not None:
        tok.chat_template = template
    return tok


def prepare(tok, tmp_path: Path, conversation: list, **settings) -> data.TokenizedData:
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": conversation}) + "\n")
    return data.prepare_data(DataConfig(path=str(src), format="chat", max_length=4096, cache_dir=str(tmp_path),
                                        **settings), tok)


def expected_mask(tok, pieces) -> tuple[list[int], list[bool]]:
    """(ids, mask) from the hand-written pieces: the tokens with a character in a target piece."""
    text = "".join(t for t, _ in pieces)
    encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    targets, pos = [], 0
    for piece, is_target in pieces:
        if is_target:
            targets.append((pos, pos + len(piece)))
        pos += len(piece)
    mask = [any(a < end and b > start for start, end in targets) for a, b in encoding.offsets]
    return encoding.ids, [False] + mask[1:]


def check_row(tok, d: data.TokenizedData, i: int, pieces) -> None:
    ids, mask = d.row(i)
    want_ids, want_mask = expected_mask(tok, pieces)
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
    # In words: every token of a reply and of its end-of-turn text is a target; no token of other text is.
    encoding = tok.backend_tokenizer.encode("".join(t for t, _ in pieces), add_special_tokens=False)
    pos = 0
    for piece, is_target in pieces:
        inside = [k for k, (a, b) in enumerate(encoding.offsets) if a >= pos and b <= pos + len(piece) and k > 0]
        assert all(mask[k] == is_target for k in inside), (piece, is_target)
        pos += len(piece)


@pytest.mark.parametrize("name", list(CASES))
def test_every_reply_and_end_of_turn_token_is_a_target_and_nothing_else(name, tmp_path):
    template, conversation, pieces = CASES[name]
    tok = tokenizer(template)
    conversation = conversation or TWO_TURNS
    # The hand-written pieces are the template's rendering.
    assert tok.apply_chat_template(conversation, tokenize=False) == "".join(t for t, _ in pieces)
    d = prepare(tok, tmp_path, conversation)
    assert d.num_rows == 1 and d.skipped_rows == 0
    check_row(tok, d, 0, pieces)


def test_chat_turns_last_locates_a_reply_whose_reasoning_the_template_reformats(tmp_path):
    tok = tokenizer(DROPS_REASONING)
    d = prepare(tok, tmp_path, REASONING, chat_turns="last")
    assert d.num_rows == 2 and d.row_ids.tolist() == [0, 0]
    for i, pieces in enumerate(LAST_TURNS):
        check_row(tok, d, i, pieces)


def test_chat_turns_last_with_a_generation_prompt_the_turn_lacks(tmp_path):
    tok = tokenizer(VICUNA)
    d = prepare(tok, tmp_path, TWO_TURNS, chat_turns="last")
    head = "A chat between a user and an assistant.\nUSER: Say red.\nASSISTANT: "
    check_row(tok, d, 0, [(head, F), ("red red" + EOS, T), ("\n", F)])
    check_row(tok, d, 1, [(head + "red red" + EOS + "\nUSER: Say blue.\nASSISTANT: ", F), ("blue" + EOS, T),
                          ("\n", F)])


def refusal(template: str, tmp_path: Path, **settings) -> str:
    with pytest.raises(UserError) as info:
        prepare(tokenizer(template), tmp_path, REASONING, **settings)
    message = info.value.message
    assert message.startswith("data error: ") and "\n" not in message and "cannot be located" in message
    return message


def test_a_rewritten_earlier_reply_is_refused_naming_chat_turns_last_where_that_works(tmp_path):
    message = refusal(DROPS_REASONING, tmp_path)
    assert "data.chat_turns: last" in message and "{% generation %}" in message


def test_a_reply_that_cannot_be_located_even_alone_is_refused_naming_generation_tags(tmp_path):
    for turns in ("all", "last"):
        (tmp_path / turns).mkdir()
        message = refusal(R1, tmp_path / turns, chat_turns=turns)
        assert "data.chat_turns" not in message and "{% generation %} tags" in message


def test_rewritten_replies_are_located_from_a_generation_prompt_with_whitespace_the_turn_lacks(tmp_path):
    tok = tokenizer(SHOUTS)
    d = prepare(tok, tmp_path, TWO_TURNS)
    check_row(tok, d, 0, [("<|user|>\nSay red.<|end|>\n<|assistant|>\n", F), ("RED RED<|end|>", T),
                          ("\n<|user|>\nSay blue.<|end|>\n<|assistant|>\n", F), ("BLUE<|end|>", T), ("\n", F)])


def test_the_pieces_mask_is_computed_from_the_pieces_alone():
    """The expectation's own check: a piece boundary inside a token makes the token a target."""
    tok = data.load_tokenizer(str(TOKENIZER))
    ids, mask = expected_mask(tok, [("<|user|>\nx", F), (" red", T)])
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-1] == "Ġred" and mask[-1] and not any(mask[:-1])
    assert np.count_nonzero(mask) == 1


def test_a_conversation_the_template_refuses_is_one_line_naming_the_row(tmp_path):
    template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                "{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError) as info:
        prepare(tokenizer(template), tmp_path, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert info.value.message.endswith("(row 1): the chat template refuses this conversation: Conversation roles "
                                       "must alternate user/assistant")
