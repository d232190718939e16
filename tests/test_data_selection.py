"""Datasets named the way `datasets` names them: data.subset, data.revision, data.data_files and split
slices (`train[:10%]`), for data.path and for each of data.sources; local files sliced and picked as
`datasets` would; a cached dataset read offline says so. No network: a Hub dataset is stood in for by a
recording `datasets.load_dataset`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_finetune import data
from ds_finetune.data import sources
from ds_finetune.data.cache import cache_path
from ds_finetune.data_config import DataConfig
from ds_finetune.errors import UserError
from harness import write_jsonl

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(str(TOKENIZER))


def texts(d, tok) -> list[str]:
    return [tok.decode(d.row(i)[0], skip_special_tokens=True).strip() for i in range(d.num_rows)]


def prepare(tok, tmp_path: Path, path: Path | str, **settings):
    return data.prepare_data(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **settings), tok)


@pytest.fixture
def ten_rows(tmp_path) -> Path:
    write_jsonl(tmp_path / "ten.jsonl", [{"text": w} for w in WORDS])
    return tmp_path / "ten.jsonl"


@pytest.mark.parametrize("split, expected", [
    ("train", WORDS), ("train[:30%]", WORDS[:3]), ("train[2:5]", WORDS[2:5]), ("train[-20%:]", WORDS[-2:]),
    ("train[:4]", WORDS[:4])])
def test_a_split_slice_cuts_local_rows_as_datasets_does(split, expected, ten_rows, tok, tmp_path):
    import datasets

    assert texts(prepare(tok, tmp_path, ten_rows, split=split), tok) == expected
    # datasets' own reading of the same file and slice agrees
    assert datasets.load_dataset("json", data_files=str(ten_rows), split=split,
                                 cache_dir=str(tmp_path / "hf"))["text"] == expected


def test_a_bad_slice_is_one_line(ten_rows, tok, tmp_path):
    with pytest.raises(UserError) as e:
        prepare(tok, tmp_path, ten_rows, split="train[:abc]")
    assert "\n" not in e.value.message and "data.split 'train[:abc]'" in e.value.message


def test_data_files_pick_files_of_a_local_folder_by_split(tok, tmp_path):
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-0.jsonl", [{"text": "zero"}])
    write_jsonl(folder / "data" / "train-1.jsonl", [{"text": "one"}])
    write_jsonl(folder / "data" / "test.jsonl", [{"text": "nine"}])
    files = {"train": "data/train-*.jsonl", "test": ["data/test.jsonl"]}
    assert texts(prepare(tok, tmp_path, folder, data_files=files), tok) == ["zero", "one"]
    assert texts(prepare(tok, tmp_path, folder, data_files=files, split="test"), tok) == ["nine"]
    assert texts(prepare(tok, tmp_path, folder, data_files="data/test.jsonl"), tok) == ["nine"]
    assert texts(prepare(tok, tmp_path, folder, data_files=files, split="train[:1]"), tok) == ["zero"]
    with pytest.raises(UserError, match="data.split validation is not a key of data.data_files \\(train, test\\)"):
        prepare(tok, tmp_path, folder, data_files=files, split="validation")
    with pytest.raises(UserError, match="match no .jsonl/.json/.parquet file"):
        prepare(tok, tmp_path, folder, data_files="nothing-*.jsonl")


@pytest.mark.parametrize("key", ["subset", "revision"])
def test_subset_and_revision_on_a_local_path_are_refused_in_one_line(key, ten_rows, tok, tmp_path):
    with pytest.raises(UserError) as e:
        prepare(tok, tmp_path, ten_rows, **{key: "x"})
    assert "\n" not in e.value.message and f"data.{key} is for a dataset loaded by `datasets`" in e.value.message


class RecordingLoadDataset:
    """datasets.load_dataset for a Hub name, recording its arguments; rows are one word each."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        import datasets
        self.calls.append(kwargs)
        return datasets.Dataset.from_list([{"text": kwargs.get("name") or "default"}])


@pytest.fixture
def hub(monkeypatch):
    import datasets
    fake = RecordingLoadDataset()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    return fake


def test_a_hub_dataset_is_loaded_with_its_subset_revision_files_and_slice(hub, tok, tmp_path):
    d = prepare(tok, tmp_path, "owner/name", subset="en", revision="v1.0", data_files={"train": "en/*.parquet"},
                split="train[:10%]")
    assert hub.calls == [{"path": "owner/name", "name": "en", "revision": "v1.0",
                          "data_files": {"train": "en/*.parquet"}, "split": "train[:10%]"}]
    assert texts(d, tok) == ["en"]
    prepare(tok, tmp_path, "owner/name")
    assert hub.calls[-1] == {"path": "owner/name", "split": "train"}  # datasets' defaults otherwise


def test_each_source_names_its_own_subset_and_revision(hub, tok, tmp_path):
    cfg = DataConfig(sources=[{"path": "owner/a", "weight": 1, "subset": "fr", "revision": "main"},
                              {"path": "owner/b", "weight": 1, "split": "test[:5]"}], cache_dir=str(tmp_path))
    mixed = data.prepare_training_data(cfg, tok)
    assert [{k: c.get(k) for k in ("path", "name", "revision", "split")} for c in hub.calls] == [
        {"path": "owner/a", "name": "fr", "revision": "main", "split": "train"},
        {"path": "owner/b", "name": None, "revision": None, "split": "test[:5]"}]
    assert mixed is not None


def test_subset_revision_and_files_are_in_the_cache_key(tok, tmp_path):
    base = DataConfig(path="owner/name", cache_dir=str(tmp_path))
    variants = [base.model_copy(update=u) for u in ({"subset": "en"}, {"revision": "v1"}, {"data_files": "a/*.json"},
                                                    {"split": "train[:10%]"})]
    assert len({cache_path(c, "h", tok) for c in [base] + variants}) == 5


def test_a_cached_dataset_read_offline_says_so(monkeypatch, hub, capsys, tok, tmp_path):
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    monkeypatch.setattr(sources, "_in_datasets_cache", lambda name: name == "owner/name")
    prepare(tok, tmp_path, "owner/name", subset="en")
    assert "owner/name: the hub is unreachable" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a dataset in the `datasets` cache"):
        prepare(tok, tmp_path, "owner/other")
