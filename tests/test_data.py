"""Data and data errors: formats text / prompt_completion / chat and their label masks,
truncation, skipped rows, packing, collation, the global target count, the token cache, and one-line
data errors (also through the real entry point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds_finetune import data
from ds_finetune.data_config import DataConfig
from ds_finetune.data import IGNORE_INDEX, collate, plan_units, unit_targets, unit_tokens
from ds_finetune.errors import UserError
from ds_finetune.sampler import epoch_permutation
from harness import assert_one_line_error, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "tiny-tokenizer"
TINY = REPO / "data" / "tiny"
LONG = 4096  # no row of the shipped data comes near this: nothing is truncated


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(cfg: DataConfig, tok) -> data.TokenizedData:
    """What every rank does: resolve -> hash -> cache path -> build if missing (holding the lock) -> map."""
    return data.prepare_data(cfg, tok)


def target_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive target tokens."""
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOKENIZER))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(tok, cache_root):
    """The shipped tiny data in each format, untruncated."""
    return {fmt: prepare(DataConfig(path=str(TINY / f"{fmt}.jsonl"), format=fmt, max_length=LONG,
                                    cache_dir=str(cache_root)), tok)
            for fmt in ("text", "prompt_completion", "chat")}


def cfg_for(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


# -------------------------------------------------------------------------------------------- formats

def test_text_rows_target_every_token_but_the_first(tiny, tok):
    d, rows = tiny["text"], read_jsonl(TINY / "text.jsonl")
    assert d.num_rows == len(rows) == 400 and d.skipped_rows == 0
    assert d.row_ids.tolist() == list(range(400))
    for i, row in enumerate(rows):
        ids, mask = d.row(i)
        assert len(ids) < LONG
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[1:-1].tolist()) == row["text"]
        assert mask.tolist() == [False] + [True] * (len(ids) - 1)


def test_prompt_completion_targets_exactly_the_completion_and_eos(tiny, tok):
    d, rows = tiny["prompt_completion"], read_jsonl(TINY / "prompt_completion.jsonl")
    assert d.num_rows == len(rows) == 400 and d.skipped_rows == 0
    for i, row in enumerate(rows):
        ids, mask = d.row(i)
        assert tok.decode(ids[mask].tolist()) == row["completion"] + tok.eos_token
        assert tok.decode(ids[~mask].tolist()) == tok.bos_token + row["prompt"]
        # Prompt first, then the completion: the targets are one run at the end of the row.
        assert len(target_runs(ids, mask)) == 1 and mask[-1] and ids[-1] == tok.eos_token_id
        assert int(d.row_targets[i]) == int(mask.sum())


def test_chat_targets_exactly_the_assistant_replies_and_their_end_token(tiny, tok):
    d, rows = tiny["chat"], read_jsonl(TINY / "chat.jsonl")
    assert d.num_rows == len(rows) == 400 and d.skipped_rows == 0
    role_markers = {tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")}
    saw_system = saw_multi_turn = False
    for i, row in enumerate(rows):
        ids, mask = d.row(i)
        replies = [m["content"] + "<|end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert [tok.decode(run) for run in target_runs(ids, mask)] == replies, i
        assert not any(int(t) in role_markers for t in ids[mask])
        # Everything that is not a target is the rendering of the other turns: no reply text leaks into it.
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tok.decode(ids.tolist()) == rendered
        saw_system |= row["messages"][0]["role"] == "system"
        saw_multi_turn |= len(replies) > 1
    assert saw_system and saw_multi_turn


def test_chat_system_and_user_tokens_are_never_targets(tok, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say red."},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "Say blue."},
                {"role": "assistant", "content": "blue blue"}]
    d = prepare(cfg_for(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tmp_path, format="chat"), tok)
    ids, mask = d.row(0)
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    targets = [p for p, m in zip(pieces, mask.tolist()) if m]
    others = tok.decode(ids[~mask].tolist())
    assert tok.decode(ids[mask].tolist()) == "red<|end|>blue blue<|end|>"
    assert targets.count("<|end|>") == 2 and pieces.count("<|end|>") == 5
    assert others == ("<|system|>\nBe brief.<|end|>\n<|user|>\nSay red.<|end|>\n<|assistant|>\n\n"
                      "<|user|>\nSay blue.<|end|>\n<|assistant|>\n\n")


def test_chat_row_without_an_assistant_reply_is_skipped_and_counted(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": []}]
    d = prepare(cfg_for(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path, format="chat"), tok)
    assert d.row_ids.tolist() == [1] and d.skipped_rows == 2


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "chat"])
def test_max_length_truncates_each_row_to_its_first_tokens(fmt, tiny, tok, tmp_path):
    full = tiny[fmt]
    short = prepare(DataConfig(path=str(TINY / f"{fmt}.jsonl"), format=fmt, max_length=16,
                               cache_dir=str(tmp_path)), tok)
    assert short.lengths.max() == 16 and full.lengths.max() > 16
    kept = set(short.row_ids.tolist())
    expected_skipped = 0
    for i in range(full.num_rows):
        ids, mask = full.row(i)
        if not mask[1:16].any():
            expected_skipped += 1
            assert int(full.row_ids[i]) not in kept
    assert short.skipped_rows == expected_skipped
    assert short.num_rows == full.num_rows - expected_skipped
    if fmt == "chat":
        assert expected_skipped > 0  # a system prompt alone fills 16 tokens
    for j, row_id in enumerate(short.row_ids.tolist()):
        ids, mask = short.row(j)
        full_ids, full_mask = full.row(row_id)
        assert ids.tolist() == full_ids[:16].tolist()
        assert mask.tolist() == full_mask[:16].tolist()


def test_a_rows_first_token_is_never_a_target(tmp_path):
    tok = data.load_tokenizer(str(TOKENIZER))
    tok.bos_token = None  # without a bos, the first token is text the format would otherwise mark a target
    assert tok.bos_token_id is None
    text = prepare(cfg_for(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), tmp_path), tok)
    ids, mask = text.row(0)
    assert tok.decode(ids.tolist()) == "hello world<|eos|>"
    assert mask.tolist() == [False] + [True] * (len(ids) - 1)
    pc = prepare(cfg_for(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "completion": "hello world"}]), tmp_path,
                         format="prompt_completion"), tok)
    ids, mask = pc.row(0)
    assert tok.decode(ids.tolist()) == "hello world<|eos|>"
    assert mask.tolist() == [False] + [True] * (len(ids) - 1)
    assert int(pc.row_targets[0]) == len(ids) - 1


def test_rows_without_targets_after_truncation_are_skipped_and_counted(tok, tmp_path):
    rows = [{"prompt": "Q: one?", "completion": " A"},
            {"prompt": "Q: " + "very long question " * 20, "completion": " B"},  # prompt > max_length
            {"prompt": "Q: two?", "completion": " C"}]
    d = prepare(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, format="prompt_completion",
                        max_length=16), tok)
    assert d.row_ids.tolist() == [0, 2]
    assert d.skipped_rows == 1
    assert tok.decode(d.row(1)[0][d.row(1)[1]].tolist()) == " C<|eos|>"


def test_json_array_and_parquet_files_read_like_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(TINY / "prompt_completion.jsonl")[:20]
    jsonl = prepare(cfg_for(write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, format="prompt_completion"), tok)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    as_json = prepare(cfg_for(tmp_path / "b.json", tmp_path, format="prompt_completion"), tok)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    as_parquet = prepare(cfg_for(tmp_path / "c.parquet", tmp_path, format="prompt_completion"), tok)
    assert jsonl.num_rows == 20
    for other in (as_json, as_parquet):
        assert np.array_equal(other.input_ids, jsonl.input_ids)
        assert np.array_equal(other.target_mask, jsonl.target_mask)
        assert np.array_equal(other.offsets, jsonl.offsets)


def test_a_folder_reads_its_data_files_in_name_order(tok, tmp_path):
    rows = read_jsonl(TINY / "text.jsonl")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", rows[5:8])
    write_jsonl(folder / "a.jsonl", rows[:5])
    write_jsonl(folder / "sub" / "c.jsonl", rows[8:10])
    (folder / "README.md").write_text("not data")
    d = prepare(cfg_for(folder, tmp_path), tok)
    assert d.num_rows == 10
    assert [tok.decode(d.row(i)[0][1:-1].tolist()) for i in range(10)] == [r["text"] for r in rows[:10]]


# -------------------------------------------------------------------------------------------- packing

def test_packing_keeps_every_row_exactly_once_in_epoch_order(tiny):
    d = tiny["chat"]
    for epoch in range(3):
        order = epoch_permutation(d.num_rows, 1234, epoch)
        units = plan_units(d, order, True, 128)
        assert np.concatenate(units).tolist() == order.tolist()
        assert len(units) < d.num_rows / 2  # the tiny rows are short: packing does pack
        sizes = [int(d.lengths[u].sum()) for u in units]
        assert max(sizes) <= 128
        # Greedy: a pack is closed only when the next row does not fit.
        for u, nxt in zip(units, units[1:]):
            assert int(d.lengths[u].sum()) + int(d.lengths[nxt[0]]) > 128


def test_a_row_longer_than_the_pack_is_a_pack_of_its_own(tiny):
    d = tiny["text"]
    order = epoch_permutation(d.num_rows, 3, 0)
    units = plan_units(d, order, True, 20)
    assert np.concatenate(units).tolist() == order.tolist()
    oversized = [u for u in units if int(d.lengths[u].sum()) > 20]
    assert oversized and all(len(u) == 1 for u in oversized)


def test_packing_is_deterministic_for_the_same_order(tiny):
    d = tiny["prompt_completion"]
    order = epoch_permutation(d.num_rows, 5, 1)
    a, b = plan_units(d, order, True, 128), plan_units(d, order.copy(), True, 128)
    assert [u.tolist() for u in a] == [u.tolist() for u in b]
    other = plan_units(d, epoch_permutation(d.num_rows, 5, 2), True, 128)
    assert [u.tolist() for u in a] != [u.tolist() for u in other]


def test_without_packing_each_unit_is_one_row(tiny):
    d = tiny["text"]
    order = epoch_permutation(d.num_rows, 0, 0)
    assert [u.tolist() for u in plan_units(d, order, False, 128)] == [[int(i)] for i in order]
    assert len(plan_units(d, order[:0], True, 128)) == 0


# -------------------------------------------------------------------------------------------- collate

@pytest.mark.parametrize("pad_id", [2, 99])
def test_collate_pads_right_with_the_pad_id_and_masks_labels(tiny, pad_id):
    d = tiny["prompt_completion"]
    units = [np.array([3]), np.array([10, 11]), np.array([7])]
    input_ids, attention, labels, positions, facts = collate(d, units, pad_id)
    assert positions is None and facts.segments is None  # not isolated: the model numbers positions itself
    # what the host knows: the positions whose next token is a target (none at the last position)
    assert (facts.targets[:, :-1] == (labels[:, 1:] != IGNORE_INDEX).numpy()).all() and not facts.targets[:, -1].any()
    rows = [[d.row(int(i)) for i in u] for u in units]
    seqs = [(np.concatenate([r[0] for r in rs]), np.concatenate([r[1] for r in rs])) for rs in rows]
    width = max(len(s[0]) for s in seqs)
    assert tuple(input_ids.shape) == tuple(labels.shape) == tuple(attention.shape) == (3, width)
    assert len({len(s[0]) for s in seqs}) > 1  # some rows really are padded
    for j, (ids, mask) in enumerate(seqs):
        n = len(ids)
        assert input_ids[j, :n].tolist() == ids.tolist()
        assert input_ids[j, n:].tolist() == [pad_id] * (width - n)
        assert attention[j].tolist() == [1] * n + [0] * (width - n)
        assert labels[j, :n].tolist() == np.where(mask, ids, IGNORE_INDEX).tolist()
        assert labels[j, n:].tolist() == [IGNORE_INDEX] * (width - n)


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "chat"])
@pytest.mark.parametrize("packing", [False, True])
def test_unit_targets_counts_the_shifted_labels(fmt, packing, tiny):
    d = tiny[fmt]
    units = plan_units(d, epoch_permutation(d.num_rows, 1, 0), packing, 128)
    for start in range(0, 64, 8):
        batch = units[start:start + 8]
        input_ids, attention, labels, _, facts = collate(d, batch, 2)
        assert (labels[:, 0] == IGNORE_INDEX).all()
        assert unit_targets(d, batch) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == int(facts.targets.sum()) > 0
        assert unit_tokens(d, batch) == int(attention.sum())
    # A batch split in two counts the same targets as the whole.
    assert unit_targets(d, units[:8]) == unit_targets(d, units[:3]) + unit_targets(d, units[3:8])


# ---------------------------------------------------------------------------------------------- cache

def test_the_second_start_reads_the_cache(tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "rows.jsonl", read_jsonl(TINY / "chat.jsonl")[:30])
    cfg = cfg_for(src, tmp_path, format="chat")
    real_build, loads = data.cache.build_cache, []

    def load_rows_once(*args, **kw):
        loads.append(args)
        if len(loads) > 1:
            raise AssertionError("the tokenized data was rebuilt although the cache holds it")
        return real_build(*args, **kw)

    monkeypatch.setattr(data, "build_cache", load_rows_once)
    first = prepare(cfg, tok)
    assert len(loads) == 1
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] != []
    second = prepare(cfg, tok)
    assert len(loads) == 1
    for field in ("input_ids", "target_mask", "offsets", "row_ids"):
        assert np.array_equal(getattr(first, field), getattr(second, field))
    assert (first.content_hash, first.skipped_rows) == (second.content_hash, second.skipped_rows)

    # New content is a new key: the next start rebuilds and sees the new row.
    with open(src, "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare(cfg, tok)
    monkeypatch.setattr(data, "build_cache", real_build)
    assert prepare(cfg, tok).num_rows == 31


def test_the_cache_key_follows_everything_that_changes_tokens(tok, tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a b c", "prompt": "a", "completion": "b"}])
    base = cfg_for(src, tmp_path)

    def key(cfg, tokenizer=tok):
        files = data.resolve_data_files(cfg.path)
        return data.cache_path(cfg, data.content_hash(files, cfg.path, cfg.split), tokenizer)

    k = key(base)
    assert k.parent == tmp_path / "cache" / "tokenized" and k.suffix == ""
    assert key(base) == k
    assert key(base.model_copy(update={"max_length": 256})) != k
    assert key(base.model_copy(update={"format": "prompt_completion"})) != k
    assert key(base.model_copy(update={"text_field": "prompt"})) != k
    # Packing is planned from the cached rows: it does not change them.
    assert key(base.model_copy(update={"packing": "isolated"})) == k
    # The same bytes under the same file name elsewhere are the same data.
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "rows.jsonl"
    copy.write_bytes(src.read_bytes())
    assert key(base.model_copy(update={"path": str(copy)})) == k
    other_tok = data.load_tokenizer(str(TOKENIZER))
    other_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert key(base, other_tok) != k
    src.write_text(json.dumps({"text": "a b d", "prompt": "a", "completion": "b"}) + "\n")
    assert key(base) != k


# --------------------------------------------------------------------------------------------- errors

def _fmt(name):
    return {"format": name}


ERROR_CASES = {
    # name: (files to write {relative path: content}, data.path, config, words the message must hold)
    "missing file": ({}, "nope.jsonl", {}, ["nope.jsonl", "no such file or folder"]),
    "missing folder": ({}, "nodir/", {}, ["nodir", "no such file or folder"]),
    "unsupported extension": ({"rows.csv": "text\nhello\n"}, "rows.csv", {},
                              ["rows.csv", "unsupported file type '.csv'", ".jsonl"]),
    "empty file": ({"empty.jsonl": ""}, "empty.jsonl", {}, ["empty.jsonl", "empty"]),
    "blank lines only": ({"blank.jsonl": "\n  \n"}, "blank.jsonl", {}, ["blank.jsonl", "empty"]),
    "empty json list": ({"rows.json": "[]"}, "rows.json", {}, ["rows.json", "empty"]),
    "folder of empty files": ({"d/a.jsonl": "", "d/b.jsonl": "\n"}, "d", {}, ["every data file is empty"]),
    "folder without data files": ({"d/readme.txt": "hi"}, "d", {}, ["holds no .jsonl/.json/.parquet files"]),
    "invalid json": ({"bad.jsonl": "{not json\n"}, "bad.jsonl", {}, ["bad.jsonl:1", "not valid JSON"]),
    "text row without text": ({"t.jsonl": '{"text": "a"}\n{"body": "b"}\n'}, "t.jsonl", {},
                              ["row 2", "'text'", "missing", "data.text_field"]),
    "text field not a string": ({"t.jsonl": '{"text": 5}\n'}, "t.jsonl", {}, ["row 1", "'text'", "not a str"]),
    "completion missing": ({"p.jsonl": '{"prompt": "a", "completion": "b"}\n' * 2 + '{"prompt": "c"}\n'}, "p.jsonl",
                           _fmt("prompt_completion"), ["row 3", "'completion'", "missing", "data.completion_field"]),
    "prompt missing": ({"p.jsonl": '{"completion": "b"}\n'}, "p.jsonl", _fmt("prompt_completion"),
                       ["row 1", "'prompt'", "data.prompt_field"]),
    "chat message without content": (
        {"c.jsonl": json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
         + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}) + "\n"},
        "c.jsonl", _fmt("chat"), ["row 2", "message 2", "'content'"]),
    "chat without messages": ({"c.jsonl": '{"text": "a"}\n'}, "c.jsonl", _fmt("chat"),
                              ["row 1", "'messages'", "missing", "data.messages_field"]),
    "all rows empty after masking": (
        {"p.jsonl": json.dumps({"prompt": "word " * 40, "completion": "x"}) + "\n" +
         json.dumps({"prompt": "other " * 40, "completion": "y"}) + "\n"},
        "p.jsonl", {"format": "prompt_completion", "max_length": 8}, ["all 2 rows", "empty after masking"]),
    "no assistant reply anywhere": ({"c.jsonl": json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n"},
                                    "c.jsonl", _fmt("chat"), ["all 1 rows", "empty after masking"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_data_errors_are_one_line_and_name_the_problem(case, tok, tmp_path):
    files, rel_path, settings, words = ERROR_CASES[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as info:
        prepare(cfg_for(tmp_path / rel_path, tmp_path, **settings), tok)
    message = info.value.message
    assert "\n" not in message and message.startswith("data error: ")
    for word in words:
        assert word in message, (word, message)
    assert info.value.exit_code == 2
    assert not (tmp_path / "cache" / "tokenized").exists() or \
        not any(p.is_dir() for p in (tmp_path / "cache" / "tokenized").iterdir())


def test_a_folder_mixing_json_and_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    pq.write_table(pa.Table.from_pylist([{"text": "b"}]), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="mixes JSON and Parquet"):
        data.resolve_data_files(str(tmp_path))


# -------------------------------------------------------------------------------- through the entry point

def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_FINETUNE_CACHE": str(tmp_path / "cache")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                           str(REPO / "configs" / "tiny.yaml"), f"output_dir={tmp_path / 'run'}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.multiproc
def test_a_missing_data_file_exits_with_one_line_and_no_traceback(tmp_path):
    proc = run_train(tmp_path, f"data.path={tmp_path / 'missing.jsonl'}")
    assert_one_line_error(proc, "data error", "missing.jsonl", "no such file or folder", code=2, last=True)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.multiproc
def test_a_row_without_its_field_exits_with_one_line_and_no_traceback(tmp_path):
    """This error is found while building the cache on local rank 0 and reaches every rank via all_gather."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    proc = run_train(tmp_path, f"data.path={rows}", "data.format=prompt_completion")
    assert_one_line_error(proc, "data error", "row 2", "'completion'", code=2, last=True)
