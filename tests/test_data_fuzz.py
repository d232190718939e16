"""Bad data never ends in a traceback: generated files of malformed rows (bytes that are not UTF-8, lone
surrogates, BOMs, NULs, wrong types, objects where strings belong, huge values, cut lines, empty files), in
every format, each either prepare or stop with one `data error:` line naming the file and the row."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_finetune import data
from ds_finetune.cli import main
from ds_finetune.data_config import DataConfig
from ds_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "assets" / "tiny-tokenizer"
FORMATS = ("text", "prompt_completion", "chat", "preference")
BAD_BYTES = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf0\x9f\x98")  # the last: a cut 4-byte character
BOM = b"\xef\xbb\xbf"
SLOT = "@@SLOT@@"  # stands in a string where raw bytes are put after json.dumps
SETTINGS = {"text": {}, "prompt_completion": {}, "chat": {},
            "preference": {"max_prompt_length": 32}}  # a huge prompt keeps its end instead of being refused


def good_row(fmt: str, rng: random.Random) -> dict:
    word = lambda: rng.choice(["apple", "blue", "seven", "cat", "river", "stone"])  # noqa: E731
    if fmt == "text":
        return {"text": f"the {word()} and the {word()}"}
    if fmt == "prompt_completion":
        return {"prompt": f"name a {word()}", "completion": f"a {word()}"}
    if fmt == "preference":
        return {"prompt": f"name a {word()}", "chosen": f"a {word()}", "rejected": f"no {word()} here"}
    return {"messages": [{"role": "user", "content": f"what is {word()}?"},
                         {"role": "assistant", "content": f"it is {word()}"}]}


def string_slots(fmt: str, row: dict) -> list[tuple]:
    """Paths (keys and indices) of the strings a format reads."""
    if fmt == "chat":
        return [("messages", i, "content") for i in range(len(row["messages"]))]
    return [(k,) for k in row]


def put(row: dict, path: tuple, value) -> None:
    node = row
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@dataclass
class Mutation:
    name: str
    expect: str  # "ok" (prepares), "refused" (stops at this row), "either"
    needle: str = ""  # what the refusal must say


def mutate(fmt: str, row: dict, rng: random.Random) -> tuple[bytes, Mutation]:
    """One malformed JSONL line (without its newline) from a good row, and what should become of it."""
    slot = rng.choice(string_slots(fmt, row))
    kind = rng.choice(MUTATIONS)
    return kind(fmt, row, slot, rng)


def _with_slot(row: dict, slot: tuple, raw: bytes, rng) -> bytes:
    put(row, slot, f"x {SLOT} y" if rng.random() < 0.7 else SLOT)
    return json.dumps(row).encode().replace(SLOT.encode(), raw)


def m_bad_bytes(fmt, row, slot, rng):
    return _with_slot(row, slot, rng.choice(BAD_BYTES), rng), Mutation("bad_bytes", "refused", "not valid UTF-8")


def m_lone_surrogate(fmt, row, slot, rng):
    escape = rng.choice([b"\\ud800", b"\\udfff", b"\\uDC80", b"\\ud83d"])  # the last: half of a pair
    return _with_slot(row, slot, escape, rng), Mutation("lone_surrogate", "refused", "lone UTF-16 surrogate")


def m_surrogate_pair(fmt, row, slot, rng):
    return _with_slot(row, slot, b"\\ud83d\\ude00", rng), Mutation("surrogate_pair", "ok")


def m_nul(fmt, row, slot, rng):
    if rng.random() < 0.5:  # an escaped NUL is text; a raw one is a control character JSON refuses
        return _with_slot(row, slot, b"\\u0000", rng), Mutation("nul_escape", "either")
    return _with_slot(row, slot, b"\x00", rng), Mutation("nul_raw", "refused", "not valid JSON")


def m_wrong_scalar(fmt, row, slot, rng):
    put(row, slot, rng.choice([5, -1.5, True, False, None, 10**30]))
    return json.dumps(row).encode(), Mutation("wrong_scalar", "refused", "data error")


def m_wrong_container(fmt, row, slot, rng):
    # "either": some layouts take lists of parts or message lists where a string is usual
    put(row, slot, rng.choice([[], ["a"], {}, {"a": "b"}, {"a": {"b": ["c", {"d": 1}]}}, [[["deep"]]]]))
    return json.dumps(row).encode(), Mutation("wrong_container", "either")


def m_whole_field(fmt, row, slot, rng):
    key = slot[0]
    row[key] = rng.choice([5, None, "text", {"role": "user"}, [1, 2], [None], [{"role": 1, "content": 2}]])
    return json.dumps(row).encode(), Mutation("whole_field", "either")


def m_huge_string(fmt, row, slot, rng):
    put(row, slot, "word " * rng.randint(2_000, 20_000))
    return json.dumps(row).encode(), Mutation("huge_string", "ok")


def m_huge_number(fmt, row, slot, rng):
    if rng.random() < 0.5:  # past Python's 4300-digit limit for ints
        return json.dumps(row).encode()[:-1] + b', "n": ' + b"9" * 5000 + b"}", Mutation("huge_int", "refused",
                                                                                            "not valid JSON")
    return json.dumps(row).encode()[:-1] + b', "n": 1e999}', Mutation("huge_float", "ok")


def m_deep(fmt, row, slot, rng):
    depth = rng.choice([50, 200_000])
    line = json.dumps(row).encode()[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    return line, (Mutation("deep_ok", "ok") if depth == 50 else Mutation("deep", "refused", "nested too deeply"))


def m_truncated(fmt, row, slot, rng):
    line = json.dumps(row).encode()
    return line[:rng.randint(1, len(line) - 1)], Mutation("truncated", "refused", "data error")


def m_not_object(fmt, row, slot, rng):
    return rng.choice([b"[1, 2]", b'"a string"', b"42", b"null", b"true"]), Mutation("not_object", "refused",
                                                                                      "must be a JSON object")


def m_bom_line(fmt, row, slot, rng):
    return BOM + json.dumps(row).encode(), Mutation("bom_line", "ok")


def m_odd_text(fmt, row, slot, rng):
    odd = rng.choice(["\ue000", "\u202e", "e\u0301", "\t\x0b\x0c", "\\", "<|end|>", "<|assistant|>\n", "\u2028"])
    put(row, slot, f"a{odd}b")
    return json.dumps(row, ensure_ascii=rng.random() < 0.5).encode(), Mutation("odd_text", "either")


def m_extra_columns(fmt, row, slot, rng):
    row["k" * rng.choice([1, 10_000])] = rng.choice([None, {"x": [1]}, "s", 3.5])
    return json.dumps(row).encode(), Mutation("extra_columns", "ok")


def m_empty_string(fmt, row, slot, rng):
    put(row, slot, "")
    return json.dumps(row).encode(), Mutation("empty_string", "either")


MUTATIONS = [m_bad_bytes, m_lone_surrogate, m_surrogate_pair, m_nul, m_wrong_scalar, m_wrong_container, m_whole_field,
             m_huge_string, m_huge_number, m_deep, m_truncated, m_not_object, m_bom_line, m_odd_text, m_extra_columns,
             m_empty_string]


@dataclass
class FuzzFile:
    path: Path
    fmt: str
    rows: int
    mutations: dict = field(default_factory=dict)  # line number -> Mutation
    empty: bool = False


def write_fuzz_file(folder: Path, index: int, rng: random.Random) -> FuzzFile:
    fmt = FORMATS[index % len(FORMATS)]
    path = folder / f"{index:04d}-{fmt}.jsonl"
    if rng.random() < 0.04:  # empty, blank, or a BOM alone
        path.write_bytes(rng.choice([b"", b"\n\n", BOM, BOM + b"\n"]))
        return FuzzFile(path, fmt, 0, empty=True)
    n = rng.randint(2, 9)
    lines, out = [], FuzzFile(path, fmt, n)
    for number in range(1, n + 1):
        row = good_row(fmt, rng)
        if number > 1 and rng.random() < 0.45:  # row 1 stays good: some row always has a target
            line, out.mutations[number] = mutate(fmt, row, rng)
        else:
            line = json.dumps(row).encode()
        lines.append(line)
    ending = b"\r\n" if rng.random() < 0.2 else b"\n"
    path.write_bytes((BOM if rng.random() < 0.2 else b"") + ending.join(lines) + ending)
    return out


def named_line(message: str, path: Path) -> int | None:
    found = re.search(re.escape(str(path)) + r":(\d+)", message)
    return int(found.group(1)) if found else None


def check_outcome(f: FuzzFile, message: str | None) -> str | None:
    """None when the outcome keeps the promise, else what is wrong."""
    first_refused = min((n for n, m in f.mutations.items() if m.expect == "refused"), default=None)
    if message is None:
        if f.empty or first_refused is not None:
            return "prepared, but it should have been refused"
        return None
    if "\n" in message or not message.startswith("data error: ") or str(f.path) not in message:
        return f"not one data error line naming the file: {message!r}"
    if f.empty:
        return None if "empty" in message else f"an empty file not called empty: {message!r}"
    line = named_line(message, f.path)
    if line is None:
        return f"no FILE:LINE in {message!r}"
    mutation = f.mutations.get(line)
    if mutation is None or mutation.expect == "ok":
        return f"line {line} named, but it is {'good' if mutation is None else mutation.name}: {message!r}"
    if first_refused is not None and line > first_refused:
        return f"line {line} named, but line {first_refused} ({f.mutations[first_refused].name}) comes first"
    if mutation.needle and mutation.needle not in message:
        return f"{mutation.name} at line {line}: {mutation.needle!r} not in {message!r}"
    return None


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOKENIZER))


def prepare(f: Path, fmt: str, cache: Path, tok) -> None:
    cfg = DataConfig(path=str(f), format=fmt, max_length=64, num_proc=1, cache_dir=str(cache), **SETTINGS[fmt])
    data.prepare_data(cfg, tok)


def test_malformed_rows_in_every_format_prepare_or_stop_in_one_line_naming_the_row(tok, tmp_path):
    rng = random.Random(40)
    files = [write_fuzz_file(tmp_path, i, rng) for i in range(260)]
    assert sum(f.rows for f in files) >= 1000
    assert sum(len(f.mutations) for f in files) >= 300
    problems, outcomes = [], {"prepared": 0, "refused": 0}
    for f in files:
        try:
            prepare(f.path, f.fmt, tmp_path / "cache", tok)
            message = None
        except UserError as e:
            message = e.message
        except Exception as e:  # a traceback: the bug this test is for
            problems.append(f"{f.path.name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        outcomes["prepared" if message is None else "refused"] += 1
        wrong = check_outcome(f, message)
        if wrong:
            problems.append(f"{f.path.name}: {wrong}")
    assert not problems, f"{len(problems)} of {len(files)} files:\n" + "\n".join(problems[:20])
    assert outcomes["prepared"] >= 40 and outcomes["refused"] >= 40, outcomes  # the fuzz reaches both ends


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80"], ids=["ff", "c328", "eda080"])
def test_a_row_that_is_not_utf8_is_named_by_file_and_line(fmt, bad, tok, tmp_path):
    rng = random.Random(0)
    rows = [json.dumps(good_row(fmt, rng)).encode() for _ in range(3)]
    rows[2] = _with_slot(good_row(fmt, rng), string_slots(fmt, good_row(fmt, rng))[-1], bad, random.Random(1))
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(UserError) as info:
        prepare(f, fmt, tmp_path / "cache", tok)
    assert info.value.message.startswith(f"data error: {f}:3 (row 3): not valid UTF-8 (byte 0x{bad[0]:02x}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lone_surrogate_escape_is_named_by_row_and_field(fmt, tok, tmp_path):
    rng = random.Random(0)
    row = good_row(fmt, rng)
    slot = string_slots(fmt, row)[-1]
    f = tmp_path / "rows.json"  # a JSON array: rows arrive decoded, not as lines
    f.write_bytes(b"[" + json.dumps(good_row(fmt, rng)).encode() + b",\n" + _with_slot(row, slot, b"\\ud800", rng)
                  + b"]")
    with pytest.raises(UserError, match=re.escape(f"{f}: item 2 (row 2): field ") + ".*lone UTF-16 surrogate"):
        prepare(f, fmt, tmp_path / "cache", tok)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_that_starts_with_a_bom_prepares(fmt, suffix, tok, tmp_path):
    rng = random.Random(0)
    rows = [json.dumps(good_row(fmt, rng)) for _ in range(3)]
    text = "\r\n".join(rows) + "\r\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]\n"
    f = tmp_path / f"windows{suffix}"
    f.write_bytes(BOM + text.encode())
    prepare(f, fmt, tmp_path / "cache", tok)
    plain = tmp_path / f"plain{suffix}"
    plain.write_bytes(text.encode())
    cache = tmp_path / "cache2"
    prepare(plain, fmt, cache, tok)
    same = [data.prepare_data(DataConfig(path=str(p), format=fmt, max_length=64, cache_dir=str(c), **SETTINGS[fmt]),
                              tok) for p, c in ((f, tmp_path / "cache"), (plain, cache))]
    assert same[0].input_ids.tolist() == same[1].input_ids.tolist()  # the BOM is not text of the first row


def test_a_json_array_that_is_not_utf8_is_named_by_file_and_line(tok, tmp_path):
    f = tmp_path / "rows.json"
    f.write_bytes(b'[{"text": "a"},\n{"text": "b\xff"}]')
    with pytest.raises(UserError, match=re.escape(f"data error: {f}:2: not valid UTF-8 (byte 0xff)")):
        prepare(f, "text", tmp_path / "cache", tok)


def test_data_prepare_prints_one_line_for_bad_rows_and_prepares_a_bom_file(tmp_path):
    """Through the CLI, as a user runs it: exit 2 and one `error:` line, or exit 0."""
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text())
    rng = random.Random(7)
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(good_row("chat", rng)).encode() + b"\n" + _with_slot(
        good_row("chat", rng), ("messages", 1, "content"), b"\xed\xa0\x80", rng) + b"\n")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(BOM + b"\n".join(json.dumps(good_row("chat", rng)).encode() for _ in range(4)) + b"\n")
    common = [f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", f"output_dir={tmp_path / 'run'}"]
    result = runner.invoke(main, ["data", "prepare", str(config), f"data.path={bad}", *common])
    assert result.exit_code == 2 and not isinstance(result.exception, (TypeError, ValueError)), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data error: {bad}:2 (row 2): not valid UTF-8 (byte 0xed at character "
                      f"{errors[0].split('character ')[1].split(')')[0]}); save the file as UTF-8 or fix the line"]
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["data", "prepare", str(config), f"data.path={bom}", *common])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "data prepared" in result.output
