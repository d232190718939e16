"""Data at scale: arrays identical to the pre-streaming implementation, parallel preparation in order,
the memory-mapped cache, the lock that replaces a collective (waiting, errors, a dead builder, other
hosts), `ds-finetune data prepare`, remembered file hashes, JSONL errors with line numbers, chat masks
for templates without whitespace control, and a run whose data takes longer than DEEPSPEED_TIMEOUT."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ds_finetune import data, hashing
from ds_finetune.data_config import DataConfig
from ds_finetune.data import cache, parallel, sources
from ds_finetune.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "tiny-tokenizer"
TINY = REPO / "data" / "tiny"

# sha256 (first 16 hex) of input_ids|target_mask|offsets|row_ids of the shipped tiny data, as the
# implementation before streaming preparation (commit 40cf14e, one process, `datasets`, .npz) wrote them.
BEFORE = {("text", 4096): "72ce699113ca589c", ("text", 16): "ac520d0b6c67b99c",
          ("prompt_completion", 4096): "47dad9f3e37fb498", ("prompt_completion", 16): "ed4e81486381883e",
          ("chat", 4096): "dff10503d94dc17b", ("chat", 128): "dff10503d94dc17b", ("chat", 16): "25ef2a05d50ad4d0"}


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOKENIZER))


def digest(d: data.TokenizedData) -> str:
    h = hashlib.sha256()
    for a in (d.input_ids, d.target_mask, d.offsets, d.row_ids):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(n)]


# --------------------------------------------------------------------------------------- same arrays

@pytest.mark.parametrize("fmt,max_length", list(BEFORE))
def test_the_arrays_are_those_of_the_implementation_before(fmt, max_length, tok, tmp_path):
    d = data.prepare_data(DataConfig(path=str(TINY / f"{fmt}.jsonl"), format=fmt, max_length=max_length,
                                     cache_dir=str(tmp_path)), tok)
    assert digest(d) == BEFORE[(fmt, max_length)]


def test_parallel_preparation_keeps_row_order_and_arrays(tok, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(TINY / "chat.jsonl"), format="chat", max_length=16, cache_dir=str(tmp_path / "a"))
    one = data.prepare_data(cfg, tok)
    monkeypatch.setattr(parallel, "SMALL_DATA_BYTES", 0)  # workers even for the tiny file
    monkeypatch.setattr(parallel, "CHUNK_ROWS", 7)  # many chunks, most in flight at once
    calls = []
    real = parallel.ProcessPoolExecutor
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    two = data.prepare_data(cfg.model_copy(update={"cache_dir": str(tmp_path / "b"), "num_proc": 2}), tok)
    assert calls == [(2,)]
    assert digest(two) == digest(one) == BEFORE[("chat", 16)]
    assert two.skipped_rows == one.skipped_rows > 0
    assert np.array_equal(two.row_targets, one.row_targets) and np.array_equal(two.lengths, one.lengths)


def test_ranks_memory_map_the_cache(tok, tmp_path):
    cfg = DataConfig(path=str(TINY / "text.jsonl"), cache_dir=str(tmp_path))
    d = data.prepare_data(cfg, tok)
    for name in ("input_ids", "target_mask", "offsets", "lengths", "row_targets", "row_ids"):
        assert isinstance(getattr(d, name), np.memmap), name
    assert np.array_equal(d.lengths, np.diff(d.offsets))
    assert d.row_targets.tolist() == [int(d.row(i)[1].sum()) for i in range(d.num_rows)]
    folder = data.locate(cfg, tok)[2]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.npy" for n in cache.ARRAYS] + ["meta.json"])
    assert not any(p.name.endswith(".tmp") for p in folder.parent.iterdir())  # committed by rename


# ----------------------------------------------------------------------------------------------- lock

def own_lock(path: Path, pid: int, host: str | None = None, token: str = "t1") -> Path:
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "token": token,
                                "started": psutil.Process(pid).create_time() if host is None else None}))
    return lock


def later(seconds: float, fn) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    t.start()
    return t


def never_build(heartbeat):
    raise AssertionError("built although another process holds the lock")


def test_a_waiter_returns_when_the_builder_commits(tmp_path):
    path = tmp_path / "tokenized" / "key"
    lock = own_lock(path, os.getpid())
    said = []
    cache.WAIT_MESSAGE_EVERY_S, saved = 0.0, cache.WAIT_MESSAGE_EVERY_S
    try:
        later(1.0, lambda: (path.mkdir(), lock.unlink()))
        assert cache.ensure_cache(never_build, path, said.append) is False
    finally:
        cache.WAIT_MESSAGE_EVERY_S = saved
    assert said and all(socket.gethostname() in m and f"pid {os.getpid()}" in m for m in said)


def test_a_waiter_reports_the_builders_data_error(tmp_path):
    path = tmp_path / "tokenized" / "key"
    lock = own_lock(path, os.getpid())
    error = path.with_name("key.error")
    later(0.5, lambda: (error.write_text(json.dumps({"token": "t1", "message": "data error: x.jsonl:3: bad"})),
                        lock.unlink()))
    with pytest.raises(UserError, match=r"^data error: x.jsonl:3: bad$"):
        cache.ensure_cache(never_build, path, lambda m: None)


def test_a_waiter_stops_with_one_line_when_the_builder_dies(tmp_path):
    builder = subprocess.Popen(["sleep", "60"])
    path = tmp_path / "tokenized" / "key"
    own_lock(path, builder.pid)
    later(1.0, lambda: (builder.kill(), builder.wait()))
    with pytest.raises(UserError, match=f"pid {builder.pid}.*died before finishing"):
        cache.ensure_cache(never_build, path, lambda m: None)
    assert not path.with_name("key.lock").exists()  # the next start builds


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    started = psutil.Process(gone.pid).create_time() if psutil.pid_exists(gone.pid) else 0.0
    gone.wait()
    path = tmp_path / "tokenized" / "key"
    own_lock(path, os.getpid())  # written with a live pid, then made a dead one's
    lock = path.with_name("key.lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "token": "old", "started": started}))
    built = []
    assert cache.ensure_cache(lambda hb: (built.append(1), path.mkdir()), path, lambda m: None) is True
    assert built == [1] and not lock.exists()


def test_a_builder_on_another_host_is_waited_for_until_its_lock_goes_stale(tmp_path, monkeypatch):
    """Shared cache dir on several nodes: another host's pid cannot be checked, its heartbeat can."""
    path = tmp_path / "tokenized" / "key"
    lock = own_lock(path, 1, host="other-node")
    monkeypatch.setattr(cache, "STALE_LOCK_S", 2.0)
    t0 = time.time()
    later(0.5, lambda: os.utime(lock))  # one heartbeat, then silence
    with pytest.raises(UserError, match="host other-node, pid 1"):
        cache.ensure_cache(never_build, path, lambda m: None)
    assert time.time() - t0 >= 2.0  # it waited while the heartbeat was fresh


def test_a_per_node_cache_dir_is_prepared_on_each_node(tok, tmp_path):
    """Per-node cache dirs: each node's first rank builds its own copy; both copies are the same data."""
    cfgs = [DataConfig(path=str(TINY / "chat.jsonl"), format="chat", cache_dir=str(tmp_path / f"node{i}"))
            for i in range(2)]
    results = [data.ensure_prepared(c, tok) for c in cfgs]
    assert [built for _, _, built in results] == [True, True]
    assert results[0][0].name == results[1][0].name  # the same key under each node's dir
    assert digest(data.read_cache(results[0][0], "h")) == digest(data.read_cache(results[1][0], "h"))


# ------------------------------------------------------------------------------------------------ CLI

def test_data_prepare_builds_once_and_then_reports_ready(tmp_path):
    from click.testing import CliRunner

    from ds_finetune.cli import main
    runner = CliRunner()
    args = ["data", "prepare", str(REPO / "configs" / "tiny.yaml"), f"data.path={TINY / 'chat.jsonl'}",
            f"data.cache_dir={tmp_path}"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "data prepared in" in first.output and "400 rows" in first.output and "tokens" in first.output
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "data ready: 400 rows" in second.output
    bad = runner.invoke(main, args[:3] + [f"data.path={tmp_path / 'nope.jsonl'}", f"data.cache_dir={tmp_path}"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: data error:")


# ------------------------------------------------------------------------------------------ file hashes

def test_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "rows.jsonl", chat_rows(3))
    memo, reads = tmp_path / "memo", []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    first = sources.content_hash([src], "", "train", memo)
    assert sources.content_hash([src], "", "train", memo) == first and len(reads) == 1
    assert sources.content_hash([src], "", "train") == first  # the memo holds the content hash itself
    src.write_text(src.read_text().replace("Say 1", "Say 7"))  # same size, new content
    assert sources.content_hash([src], "", "train", memo) != first and len(reads) == 3


# ------------------------------------------------------------------------------------------ bad input

def test_a_row_keeps_its_own_types_and_the_error_names_its_line(tok, tmp_path):
    rows = chat_rows(50) + [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows)), format="chat", cache_dir=str(tmp_path))
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg, tok)
    assert f"{tmp_path / 'c.jsonl'}:51 (row 51), message 2: 'content'" in info.value.message


def test_a_truncated_last_line_is_named_with_its_number(tok, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", chat_rows(5))
    src.write_text(src.read_text() + '{"messages": [{"role": "user", "content": "cut he')
    with pytest.raises(UserError) as info:
        data.prepare_data(DataConfig(path=str(src), format="chat", cache_dir=str(tmp_path)), tok)
    assert info.value.message.startswith(f"data error: {src}:6 (row 6): not valid JSON")
    assert "\n" not in info.value.message


def test_blank_lines_are_skipped_but_line_numbers_stay_those_of_the_file(tok, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"}\n\n{"body": "c"}\n')
    with pytest.raises(UserError, match=r"t.jsonl:5 \(row 3\): field 'text' is missing"):
        data.prepare_data(DataConfig(path=str(src), cache_dir=str(tmp_path)), tok)


def test_a_dataset_name_neither_on_disk_nor_cached_fails_at_once(tok, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: pytest.fail("datasets was asked (and retries)"))
    with pytest.raises(UserError) as info:
        data.prepare_data(DataConfig(path="someone/no-such-set", cache_dir=str(tmp_path)), tok)
    assert "someone/no-such-set" in info.value.message and "datasets.load_dataset" in info.value.message


# ------------------------------------------------------------------------------------------ chat masks

# Shaped like real templates written without whitespace control: the generation prompt's newline comes
# from a literal after `}}` (not trimmed by trim_blocks) that an assistant turn does not have; an eos the
# rendering appends when there is no generation prompt; a default system prompt.
TEMPLATES = {
    "newline after the generation prompt": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"),
    "eos without a generation prompt": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
    "default system prompt": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\nYou are helpful.<|end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>' }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_reply_token_is_a_target_whatever_the_templates_whitespace(name, tmp_path):
    tok = data.load_tokenizer(str(TOKENIZER))
    tok.chat_template = TEMPLATES[name]
    conversation = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red red"},
                    {"role": "user", "content": "Say blue."}, {"role": "assistant", "content": "blue"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    d = data.prepare_data(DataConfig(path=str(src), format="chat", cache_dir=str(tmp_path)), tok)
    ids, mask = d.row(0)
    runs = harness.target_runs(ids.tolist(), mask.tolist())
    # What the template writes after the last turn (an eos) belongs to the last reply's targets.
    last = "blue<|end|>\n<|eos|>" if "eos_token" in TEMPLATES[name] else "blue<|end|>"
    assert [tok.decode(r).strip() for r in runs] == ["red red<|end|>", last]


def mask_from_every_tokens_offsets(text: str, offsets, spans) -> list[bool]:
    """The reference (the implementation before the lookups): a token is a target if one of its characters
    is in a span; where a span ends inside a token (the renderings parted there), that token is not."""
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(o), dtype=bool)
    for a, b, cut_inside_token in spans:
        if cut_inside_token:
            straddling = o[(o[:, 0] < b) & (o[:, 1] > b), 0]
            b = len(text[:int(straddling.min())].rstrip()) if len(straddling) else b
        mask |= (o[:, 0] < b) & (o[:, 1] > a) & (b > a)
    return mask.tolist()


@pytest.mark.parametrize("name", [None, *TEMPLATES])
def test_masks_from_token_lookups_equal_masks_from_every_tokens_offsets(name):
    """The chat masks are found with a few character->token lookups per reply; the reference marks every
    token whose offsets overlap a reply, on text with characters that span several tokens (emoji, CJK,
    combining marks) and templates whose renderings part inside a token."""
    import random
    from ds_finetune.data import chat
    tok = data.load_tokenizer(str(TOKENIZER))
    if name is not None:
        tok.chat_template = TEMPLATES[name]
    rng = random.Random(3)
    pieces = ["red", "blue", " ", "\n", "😀", "日本語", "é", "e\u0301", "<|end|>", "  ", "x" * 7, "🇫🇷"]
    render = chat.ChatRenderer(tok)
    checked = 0
    for _ in range(300):
        messages = []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                messages.append({"role": role, "content": "".join(rng.choices(pieces, k=rng.randint(1, 6)))})
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        text, spans = chat.reply_spans(tok, render, messages, replies, "test")
        encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        got = chat.span_mask(text, encoding, len(encoding.ids), spans)
        assert got.tolist() == mask_from_every_tokens_offsets(text, encoding.offsets, spans), messages
        checked += bool(got.any())
    assert checked > 250


# ------------------------------------------------------------------------------- longer than a timeout

def start_slow_preparation(folder: Path) -> harness.EarlyJob:
    env = {"DEEPSPEED_TIMEOUT": "1", "DS_FINETUNE_PREPARE_DELAY": "65", "DS_FINETUNE_CACHE": str(folder / "cache")}
    return harness.EarlyJob(harness.train_argv(folder / "run", ["train.max_steps=2", "checkpoint.every_steps=0"]),
                            env, folder)


@pytest.mark.multiproc
@harness.started_early(start_slow_preparation)
def test_a_run_whose_data_takes_longer_than_deepspeed_timeout_trains(request):
    """One rank builds (65 s, injected) while the other waits on the lock file; DEEPSPEED_TIMEOUT=1 (minute)
    would have ended a wait in a collective with a gloo timeout. The job starts with the session (it
    mostly sleeps)."""
    job = harness.early_job(request)
    proc = job.result(timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert [r["step"] for r in harness.metrics(job.folder / "run")] == [1, 2]
    # one rank prepared for 65 s (the other waited on the lock file: a collective would have timed out)
    assert proc.stdout.count("[fault injection] sleeping 65 s while preparing the data") == 1