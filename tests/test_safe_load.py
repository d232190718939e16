"""Checkpoints are data: every load of a checkpoint file goes through torch's safe unpickler with an
allowlist of the classes DeepSpeed pickles. A checkpoint file carrying a pickled call (a `__reduce__`
payload that would create a marker file), with a manifest rewritten to match it, is refused by `ckpt
verify`, `ckpt export`, `train --resume`, a resume under another ZeRO stage (conversion), DeepSpeed's own
load and a LoRA export (tests/test_lora.py); the payload never runs. One crafted checkpoint is shared."""
import enum
import io
import json
import os
import pickletools
import subprocess

import pytest
import torch

import harness
from ds_finetune.checkpoint import ds_internals
from ds_finetune.errors import UserError
from ds_finetune.files import sha256_file

CLI = str(harness.BIN / "ds-finetune")
TAG = "step_00000004"


class Payload:
    """What an attacker adds to a checkpoint file: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_payload_runs(path, marker):
    """The positive control: plain unpickling of the same file (torch.load with weights_only=False) runs the
    payload and creates the marker, so the marker's absence after a safe load proves that load refused it.
    The marker is removed again."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists(), f"the payload in {path} does not run under plain pickle: its marker proves nothing"
    marker.unlink()


def craft(tag_dir, marker, name: str = "mp_rank_00_model_states.pt"):
    """Add the payload to one file of a committed checkpoint and rewrite the manifest to match it (the payload
    checked to run under plain pickle)."""
    path = tag_dir / name
    state = ds_internals.load_checkpoint_file(path)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (tag_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert_payload_runs(path, marker)
    return path


# ------------------------------------------------------------------------------------------- in-process

def test_a_file_with_a_payload_is_refused_naming_the_file_and_the_global(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Payload(marker)}, path)
    for mmap in (False, True):
        with pytest.raises(UserError) as e:
            ds_internals.load_checkpoint_file(path, mmap=mmap)
        assert str(path) in str(e.value) and "posix.system" in str(e.value) and "\n" not in str(e.value)
    assert_payload_runs(path, marker)


def test_deepspeeds_own_loads_go_through_the_safe_loader(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "payload-ran"
    torch.save({"payload": Payload(marker)}, tmp_path / "bad.pt")
    torch.save({"w": torch.arange(3)}, tmp_path / "good.pt")
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    ds_internals.route_checkpoint_reads(engine)
    assert torch.equal(engine.checkpoint_engine.load(str(tmp_path / "good.pt"), map_location="cpu")["w"],
                       torch.arange(3))
    with pytest.raises(UserError, match="posix.system"):
        engine.checkpoint_engine.load(str(tmp_path / "bad.pt"), map_location=torch.device("cpu"))
    assert_payload_runs(tmp_path / "bad.pt", marker)
    other = SimpleNamespace(checkpoint_engine=object())  # a checkpoint engine we cannot make safe: refused
    with pytest.raises(UserError, match="cannot be made to load checkpoints safely"):
        ds_internals.route_checkpoint_reads(other)


def test_the_allowlist_holds_classes_whose_rebuilding_runs_no_code():
    """The safe unpickler rebuilds an allowed class with __new__ and a __dict__ update (or __setstate__),
    or calls it: none of these may be overridden (an enum's value lookup aside). Their __init__ methods
    assign attributes only (reviewed: DeepSpeed's loss scalers, fragment_address is a dataclass)."""
    pairs = ds_internals.checkpoint_globals()
    assert [name for _, name in pairs] == list(ds_internals.CHECKPOINT_GLOBALS)
    for cls, name in pairs:
        assert isinstance(cls, type) and f"{cls.__module__}.{cls.__qualname__}" == name
        if issubclass(cls, enum.Enum):
            assert set(vars(cls)) & {"__setstate__", "__reduce_ex__", "_missing_"} == set(), name
            continue
        for base in cls.__mro__[:-1]:  # object's own are the plain ones
            hooks = {"__new__", "__setstate__", "__reduce__", "__reduce_ex__", "__setattr__", "__getattr__",
                     "__getattribute__", "__set_name__", "__init_subclass__"} & set(vars(base))
            assert not hooks, (name, base, hooks)


def test_the_check_decides_as_the_loader_without_importing_deepspeed(tmp_path):
    """`ckpt verify`/`list` check files with placeholders for the allowed classes (no DeepSpeed import:
    `list --json` stays clean JSON); a file holding DeepSpeed's classes passes, a payload does not."""
    import sys

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.save({"s": LossScaler(1.0), "z": ZeroStageEnum.weights, "f": fragment_address(3, 4),
                "t": torch.ones(2)}, tmp_path / "ok.pt")
    torch.save({"payload": Payload(tmp_path / "ran")}, tmp_path / "bad.pt")
    code = ("import sys; from ds_finetune.checkpoint import safe_pickle; safe_pickle.check(sys.argv[1]); "
            "assert 'deepspeed' not in sys.modules; print('ok')")
    ok = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ok.pt")], capture_output=True, text=True)
    assert ok.stdout.strip() == "ok", ok.stderr[-2000:]
    from ds_finetune.checkpoint import safe_pickle
    with pytest.raises(safe_pickle.UnsafeCheckpointFile, match="posix.system"):
        safe_pickle.check(tmp_path / "bad.pt")
    assert_payload_runs(tmp_path / "bad.pt", tmp_path / "ran")


def test_fp16_loss_scaler_state_round_trips_through_the_safe_loader(tmp_path):
    """ZeRO 1-3 under fp16 save DeepSpeed's DynamicLossScaler object (this CPU cannot train fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    scaler = CreateLossScaler(torch.half, 0, True, dict(init_scale=2.0**16, scale_window=1000, min_scale=1,
                                                        delayed_shift=2, consecutive_hysteresis=False))
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter = 2.0**15, 7, 6  # as after an overflow
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients}, tmp_path / "o.pt")
    back = ds_internals.load_checkpoint_file(tmp_path / "o.pt")
    assert type(back["loss_scaler"]) is type(scaler) and vars(back["loss_scaler"]) == vars(scaler)
    assert back["zero_stage"] is ZeroStageEnum.gradients


def test_client_state_and_trainer_state_are_plain_values():
    """What we put into DeepSpeed's files (client_state) pickles without a single global; what the manifest
    holds is JSON."""
    from ds_finetune.state import TrainState
    from ds_finetune.dist import capture_rng

    buf = io.BytesIO()
    torch.save({"rng_states": [capture_rng()], "param_group_names": [["a.weight"], ["b.bias"]]}, buf)
    assert no_globals(buf.getvalue())
    state = TrainState(step=3, fingerprint={"exact": {"x": "1"}}, eval_loss=1.5, wandb_run_id="ab")
    assert json.loads(json.dumps(state.to_manifest())) == state.to_manifest()


def no_globals(zipped: bytes) -> bool:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return not any(op.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD")
                   for op, _, _ in pickletools.genops(pkl))


# --------------------------------------------------------------------------------- one crafted checkpoint

@pytest.fixture(scope="module")
def crafted(saved_at_step4, tmp_path_factory):
    """A copy of the ZeRO-2 run killed after its step-4 checkpoint, whose step 4 carries the payload in its
    model states, with a matching manifest; and the marker file the payload would create."""
    run = harness.copy_run(saved_at_step4(2), tmp_path_factory.mktemp("crafted") / "run")
    marker = run.parent / "payload-ran"
    craft(run / "checkpoints" / TAG, marker)
    return run, marker


@pytest.mark.multiproc
def test_saved_checkpoints_hold_plain_client_state_and_only_allowed_classes(saved_at_step4):
    tag_dir = saved_at_step4(2) / "checkpoints" / TAG
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)  # torch's own allowlist only
    for key in ("rng_states", "param_group_names"):
        buf = io.BytesIO()
        torch.save(states[key], buf)
        assert no_globals(buf.getvalue()), key
    for f in sorted(tag_dir.glob("*.pt")):
        ds_internals.load_checkpoint_file(f)


@pytest.mark.multiproc
def test_verify_list_and_export_refuse_the_crafted_checkpoint(crafted, tmp_path):
    run, marker = crafted
    before = harness.snapshot(run)
    verify = subprocess.run([CLI, "ckpt", "verify", str(run / "checkpoints" / TAG)], capture_output=True, text=True)
    assert verify.returncode == 1 and "unsafe" in verify.stderr and "posix.system" in verify.stderr
    listing = subprocess.run([CLI, "ckpt", "list", str(run)], capture_output=True, text=True)
    assert listing.returncode == 0 and "unsafe" in listing.stdout and "would refuse" in listing.stdout
    export = subprocess.run([CLI, "ckpt", "export", str(run / "checkpoints" / TAG), str(tmp_path / "out")],
                            capture_output=True, text=True)
    harness.assert_one_line_error(export, TAG, "mp_rank_00_model_states.pt", "posix.system", "unsafe")
    assert not (tmp_path / "out").exists()
    assert not marker.exists() and harness.snapshot(run) == before


@pytest.mark.multiproc
def test_the_conversion_reader_refuses_the_crafted_file(crafted):
    """What a resume under another stage and an export read the partitions with, in-process, past the
    manifest check: the loader itself refuses."""
    run, marker = crafted
    with pytest.raises(UserError, match="posix.system"):
        ds_internals.ZeroCheckpoint(run / "checkpoints" / TAG, 2, 2)
    assert not marker.exists()


@pytest.mark.multiproc
@pytest.mark.parametrize("overrides, nproc", [(["train.zero_stage=2"], 2), (["train.zero_stage=3"], 1)],
                         ids=["same-stage", "converted"])
def test_resume_refuses_the_crafted_checkpoint_and_changes_nothing(crafted, overrides, nproc):
    run, marker = crafted
    before = harness.snapshot(run)
    proc = harness.train(run, overrides, nproc=nproc, resume="auto", expect_ok=False)
    harness.assert_one_line_error(proc, f"{TAG}/mp_rank_00_model_states.pt", "posix.system")
    assert proc.returncode == 2
    assert not marker.exists() and harness.snapshot(run) == before
