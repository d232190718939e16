"""model.revision and model.trust_remote_code reach every from_pretrained (model, config, tokenizer), and
are in the resume fingerprint only when set."""
from __future__ import annotations

from pathlib import Path

import pytest

from ds_finetune.config import load_config
from ds_finetune.data import load_tokenizer
from ds_finetune.errors import UserError
from ds_finetune.fingerprint import config_fingerprint

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
NAMED = ["model.config=null", "model.name_or_path=org/model", "model.tokenizer=null"]


class Recorder:
    def __init__(self, error: Exception | None = None):
        self.calls, self.error = [], error

    def __call__(self, name, *args, **kwargs):
        self.calls.append((name, kwargs))
        raise self.error or RuntimeError("recorded")  # stop before anything is loaded


def test_revision_and_remote_code_reach_the_model_config_and_tokenizer(monkeypatch):
    import transformers

    from ds_finetune.model import build_model
    from ds_finetune.zero import model_hidden_size
    cfg = load_config(TINY, [*NAMED, "model.revision=v1.2", "model.trust_remote_code=true"])
    seen = {}
    for cls in ("AutoModelForCausalLM", "AutoConfig", "AutoTokenizer"):
        seen[cls] = Recorder(OSError("recorded"))
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", seen[cls])
    with pytest.raises(UserError):
        build_model(cfg, {})
    assert model_hidden_size(cfg.model) is None
    with pytest.raises(UserError):
        load_tokenizer(cfg.model.name_or_path, **cfg.model.hub_options(for_tokenizer=True))
    for cls, recorder in seen.items():
        assert recorder.calls, cls
        name, kwargs = recorder.calls[0]
        assert name == "org/model" and kwargs["revision"] == "v1.2" and kwargs["trust_remote_code"] is True, (cls,
                                                                                                          kwargs)


def test_unset_options_are_not_passed_and_a_separate_tokenizer_keeps_its_default_revision():
    cfg = load_config(TINY, [*NAMED, "model.revision=v1.2"])
    assert cfg.model.hub_options() == {"revision": "v1.2"}
    assert load_config(TINY, NAMED).model.hub_options() == {}
    other = load_config(TINY, [*NAMED, "model.revision=v1.2", "model.tokenizer=org/tok"])
    assert other.model.hub_options(for_tokenizer=True) == {}


def test_a_model_that_needs_remote_code_says_which_setting_in_one_line(monkeypatch):
    import transformers

    from ds_finetune.model import build_model
    needs = ValueError("The repository org/model contains custom code which must be executed to correctly load "
                       "the model.\nPlease pass the argument `trust_remote_code=True` to allow custom code to be run.")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", Recorder(needs))
    with pytest.raises(UserError) as info:
        build_model(load_config(TINY, NAMED), {})
    assert "\n" not in info.value.message and "set model.trust_remote_code: true" in info.value.message


def test_the_fingerprint_has_the_options_only_when_set():
    plain = config_fingerprint(load_config(TINY), 8, "h")["exact"]["model"]
    assert "revision" not in plain and "trust_remote_code" not in plain  # existing checkpoints match
    pinned = config_fingerprint(load_config(TINY, ["model.revision=abc", "model.trust_remote_code=true"]), 8, "h")
    assert pinned["exact"]["model"]["revision"] == "abc" and pinned["exact"]["model"]["trust_remote_code"] is True


def test_a_lora_base_is_found_hashed_and_merged_at_the_runs_revision(monkeypatch, tmp_path):
    """The base's snapshot is looked up at model.revision (hashing it for the fingerprint, and for a merged
    export), and the export reads the revision and remote-code choice from the checkpoint's fingerprint."""
    import huggingface_hub

    from ds_finetune import lora
    from ds_finetune.checkpoint.export import hub_options
    from ds_finetune.checkpoint.verify import CheckpointInfo
    calls = []

    def snapshot(name, **kwargs):
        calls.append((name, kwargs))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    (tmp_path / "config.json").write_text("{}")
    lora.base_model_files("org/model", revision="v1.2")
    assert calls == [("org/model", {"revision": "v1.2", "local_files_only": True})]
    cfg = load_config(TINY, [*NAMED, "model.revision=v1.2", "model.trust_remote_code=true"])
    fingerprint = config_fingerprint(cfg, 8, "sha", {"config.json": "x"})
    info = CheckpointInfo.__new__(CheckpointInfo)
    info.manifest = {"trainer_state": {"fingerprint": fingerprint}}
    assert hub_options(info) == {"revision": "v1.2", "trust_remote_code": True}
    info.manifest = {"trainer_state": {"fingerprint": config_fingerprint(load_config(TINY, NAMED), 8, "sha", {})}}
    assert hub_options(info) == {}
