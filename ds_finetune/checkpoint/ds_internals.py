"""Every use of DeepSpeed's private API by the checkpoint code, in one place (the house rule: DeepSpeed's
private API only in a `ds_internals.py`; `ds_finetune/ds_internals.py` holds the others and the version
check).

What is private and why we use it:
* `engine.checkpoint_engine.save`: replaced per save so shards stream through our hashing file object
  (sha256 and size as the bytes go out, fsync before they count) instead of a second read; and
  `engine.save_non_zero_checkpoint`, set for one save so that the ranks of a node write the replicated
  model states file together (`stripes.py`).
* `deepspeed.utils.zero_to_fp32.get_optim_files` and the layout of `*_model_states.pt` and
  `*_optim_states.pt` (flat fp32 partitions, their alignment paddings, the moments in the same layout):
  `ZeroCheckpoint` reads them memory-mapped and merges one parameter at a time, as zero_to_fp32 merges
  the whole model.
* `engine.checkpoint_engine.load`: replaced before `load_checkpoint` so DeepSpeed's own loads go through
  `load_checkpoint_file` (torch's safe unpickler) instead of its `torch.load(..., weights_only=False)`.
* The classes DeepSpeed pickles into its files (`safe_pickle.CHECKPOINT_GLOBALS`, by name), which that
  loader allows (`checkpoint_globals` imports them).
* ZeRO's flat fp32 groups, `_lazy_init_hp_params_optimizer_state` and the engine's step counters:
  filling the optimizer state of a fresh engine from a converted checkpoint.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ds_finetune.checkpoint import safe_pickle
from ds_finetune.checkpoint.safe_pickle import CHECKPOINT_GLOBALS
from ds_finetune.ds_internals import check_deepspeed_version
from ds_finetune.errors import UserError

check_deepspeed_version()  # explicit, although importing ds_finetune.ds_internals ran it already


# ------------------------------------------------------------------------------------------------ save

def route_checkpoint_writes(engine, save) -> bool:
    """Make this engine's next `save_checkpoint` write each file with `save(state_dict, path)`. Returns
    False (and changes nothing) when the engine uses a checkpoint engine other than torch's."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False
    engine.checkpoint_engine.save = save  # an instance attribute, replaced at every save: never nested
    return True


MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2's model states file (the module's weights, the client state)


def model_states_replicated(engine) -> bool:
    """Whether every rank holds the same model states (ZeRO 1 and 2: the weights are all-gathered after each
    step; ZeRO 0's file also holds the optimizer, which bf16 partitions, and ZeRO 3's holds no weights)."""
    return engine.zero_optimization_stage() in (1, 2) and not engine.has_moe_layers


@contextmanager
def model_states_written_by(engine, writes: bool):
    """Make this engine's next save hand the model states file to its checkpoint engine's `save` when
    `writes`, whatever its rank (DeepSpeed has only data-parallel rank 0 write it, `save_non_zero_checkpoint`;
    every rank builds the state)."""
    before = engine.save_non_zero_checkpoint
    engine.save_non_zero_checkpoint = writes or before
    try:
        yield
    finally:
        engine.save_non_zero_checkpoint = before


# ------------------------------------------------------------------------------------------------ load

def checkpoint_globals() -> list:
    """[(class, name)] for every name in safe_pickle.CHECKPOINT_GLOBALS: the allowlist of the safe loader."""
    out = []
    for name in CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append((getattr(importlib.import_module(module), attr), name))
    return out


def load_checkpoint_file(path, map_location="cpu", mmap: bool = False):
    """torch.load through torch's safe unpickler, allowing CHECKPOINT_GLOBALS besides torch's own. A file
    that needs any other global (a class, or a function such as os.system that a crafted file would call)
    is refused, nothing of it having run: a one-line UserError naming the file and the global."""
    return safe_pickle.load(path, checkpoint_globals(), map_location, mmap)


def route_checkpoint_reads(engine) -> None:
    """Make this engine's `load_checkpoint` read every file with `load_checkpoint_file` (DeepSpeed's own
    loads unpickle with weights_only=False). An engine with another checkpoint engine is refused: its
    loads cannot be made safe."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise UserError(f"checkpoint error: DeepSpeed's {type(engine.checkpoint_engine).__name__} cannot be made to "
                        f"load checkpoints safely; remove the checkpoint engine from the DeepSpeed config")
    to_device = optimizer_state_on_device(engine)
    engine.checkpoint_engine.load = lambda path, map_location=None: load_for_engine(path, map_location, to_device)


def optimizer_state_on_device(engine) -> bool:
    """Whether the optimizer's parameters, and so its state, live on an accelerator (not under ZeRO-Offload
    or on a CPU run): torch's `Optimizer.load_state_dict` then copies each loaded state tensor but `step` to
    its parameter's device."""
    optimizer = getattr(engine, "optimizer", None)
    # ZeRO-3 puts its fp32 partitions into the torch optimizer's param_groups only for a step or a load
    params = list(getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])
    if not params:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # ZeRO's and bf16's wrap torch's
        params = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]
    return bool(params) and all(p.device.type != "cpu" for p in params)


# Where DeepSpeed's load_checkpoint only copies the loaded tensors into its own buffers: the module's weights
# (`module.load_state_dict`) and ZeRO's fp32 partitions (`_load_legacy_checkpoint` at stages 1-2,
# `_rigid_load_state_dict` at 3). Everything else may be kept as loaded: torch's `Optimizer.load_state_dict`
# keeps a state tensor that already has the parameter's device and dtype (the Adam moments on the CPU, as
# under ZeRO-Offload), and the client state goes to the caller.
COPIED_BY_DEEPSPEED = frozenset({"module", "single_partition_of_fp32_groups", "fp32_flat_groups"})


def load_for_engine(path, map_location=None, optimizer_state_to_device: bool = False):
    """A file for DeepSpeed's `load_checkpoint`, safely (`load_checkpoint_file`) and memory-mapped: the
    tensors DeepSpeed copies (COPIED_BY_DEEPSPEED) are read from the page cache straight into its buffers,
    with no whole second copy allocated first (a resume has just read the file to verify it); so are an
    optimizer's state tensors that `Optimizer.load_state_dict` copies to the device
    (`optimizer_state_to_device`: on a GPU, the Adam moments go there with no host copy of them first). Every
    other tensor gets memory of its own (`_owned`), so the engine never keeps a mapping of a checkpoint file,
    whose disk space would stay in use after the checkpoint is deleted."""
    state, mapped = load_mapped(path, map_location)
    return _owned(state, to_device=optimizer_state_to_device) if mapped else state


def _owned(obj, key=None, to_device: bool = False):
    """`obj` with every tensor outside COPIED_BY_DEEPSPEED keys copied out of the file mapping (whose
    pages are then dropped from this process); with `to_device`, of an optimizer's per-parameter state (a
    torch state dict's "state") only `step`, which torch keeps where it was loaded."""
    if key in COPIED_BY_DEEPSPEED:
        return obj
    if to_device and key == "state" and isinstance(obj, dict):
        return {p: _step_owned(state) for p, state in obj.items()}
    if isinstance(obj, torch.Tensor):
        copy = obj.clone()
        if isinstance(obj, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        if obj.device.type == "cpu":
            release_pages(obj)
        return copy
    if isinstance(obj, dict):
        for k in obj:
            obj[k] = _owned(obj[k], k, to_device)
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_owned(v, None, to_device) for v in obj]
        return items if isinstance(obj, list) else type(obj)(items)
    return obj


def _step_owned(state):
    """One parameter's optimizer state with only its `step` copied out of the mapping: load_state_dict copies
    the rest (the moments) to the device."""
    if not isinstance(state, dict):
        return state
    return {k: _owned(v, k) if k == "step" else v for k, v in state.items()}


# ------------------------------------------------------------------------------------ read partitions

MADV_DONTNEED = 4  # Linux
TENSOR_KEYS = ("weights", "exp_avg", "exp_avg_sq")


def load_mapped(path: Path, map_location="cpu") -> tuple[dict, bool]:
    """A checkpoint file loaded safely (`load_checkpoint_file`) with every tensor memory-mapped (its pages
    are read only when touched); a file in the legacy format cannot be mapped and is loaded whole. Returns
    (state, mapped). Only called on files the checkpoint's manifest has verified (sizes and sha256)."""
    try:
        return load_checkpoint_file(path, map_location, mmap=True), True
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return load_checkpoint_file(path, map_location), False


_libc = None


def release_pages(t: torch.Tensor) -> None:
    """Drop the pages of a tensor that lives in a private read-only file mapping from this process (they
    are read from the file again if touched): reading tensor by tensor then keeps one tensor resident,
    not every page read so far. Never call it on memory that is not such a mapping (it would zero it)."""
    global _libc
    if sys.platform != "linux" or t.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def model_states_file(tag_dir: Path) -> Path:
    for name in (MODEL_STATES, "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).exists():
            return tag_dir / name
    raise UserError(f"checkpoint error: {tag_dir} holds no DeepSpeed model states file")


class ZeroCheckpoint:
    """A verified checkpoint folder of any ZeRO stage, read one parameter at a time.

    Its files are memory-mapped; `read(name, key)` copies one full fp32 tensor (weights, exp_avg or
    exp_avg_sq) together from the pieces the saving ranks held, then drops the mapped pages it touched.
    Memory: the largest parameter, whatever the model's size. Stages 1-3 follow the flat layout that
    DeepSpeed's `zero_to_fp32.py` merges (the moments share the fp32 partitions' layout)."""

    def __init__(self, tag_dir: Path, stage: int, world_size: int):
        self.tag_dir, self.stage = tag_dir, stage
        self.model_states, self.mapped = load_mapped(model_states_file(tag_dir))
        self.shapes: dict[str, torch.Size] = {}
        self.pieces: dict[str, list[tuple[int, int, int, int]]] = {}  # name -> (rank, group, start, numel)
        if stage == 0:
            self._open_stage0()
        else:
            self._open_partitions(world_size)
        self.names = list(self.shapes)

    # -- stage 0: the model states file holds the module and the torch optimizer state whole
    def _open_stage0(self) -> None:
        ms = self.model_states
        names = [n for group in ms["param_group_names"] for n in group]
        optimizer, self.masters0 = stage0_optimizer_state(ms["optimizer"], names)
        index = [i for group in optimizer["param_groups"] for i in group["params"]]
        self.state0 = {name: optimizer["state"].get(i, {}) for name, i in zip(names, index)}
        self.shapes = {name: ms["module"][name].shape for name in names}
        self.step = max([0.0] + [float(s["step"]) for s in self.state0.values() if "step" in s])

    # -- stages 1-3: every rank's optimizer file holds its partition of the flat fp32 groups and moments
    def _open_partitions(self, world_size: int) -> None:
        from deepspeed.utils import zero_to_fp32 as z

        files = z.get_optim_files(str(self.tag_dir))
        if len(files) != world_size:
            raise UserError(f"checkpoint error: {self.tag_dir} holds {len(files)} optimizer files for "
                            f"{world_size} ranks")
        self.flats = {key: [] for key in TENSOR_KEYS}
        self.step, paddings = 0.0, None
        for f in files:
            state, mapped = load_mapped(Path(f))
            self.mapped = self.mapped and mapped
            osd = state["optimizer_state_dict"]
            if int(osd["zero_stage"]) != self.stage:
                raise UserError(f"checkpoint error: {f} is ZeRO {osd['zero_stage']}, the manifest says {self.stage}")
            if self.stage <= 2:
                weights, states = osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"]
                paddings = osd.get("param_alignment_paddings")
            else:
                weights, states = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
            self.flats["weights"].append(list(weights))
            # A group never stepped has no state, and an optimizer other than Adam (train.optimizer lion,
            # adamw_8bit) not these moments: zeros, as at stage 0. Such a checkpoint is only read for its weights
            # (export); converting it to another layout is refused (optim.check_convertible).
            for key in ("exp_avg", "exp_avg_sq"):
                self.flats[key].append([states[g][key] if key in states.get(g, {}) else torch.zeros_like(w)
                                        for g, w in enumerate(weights)])
            self.step = max([self.step] + [float(s["step"]) for s in states.values() if "step" in s])
        param_shapes = self.model_states["param_shapes"]
        if self.stage <= 2:
            self._layout_zero2(param_shapes, paddings)
        else:
            self._layout_zero3({k: v for group in param_shapes for k, v in group.items()})

    def _layout_zero2(self, param_shapes: list, paddings) -> None:
        """ZeRO 1/2: group g's flat vector is the ranks' partitions end to end; its parameters lie in it
        in order, each followed by its alignment padding."""
        world = len(self.flats["weights"])
        for g, shapes in enumerate(param_shapes):
            sizes = [self.flats["weights"][r][g].numel() for r in range(world)]
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                self.shapes[name] = torch.Size(shape)
                numel = self.shapes[name].numel()
                self.pieces[name] = [(r, g, start, n) for r, start, n in _cut(sizes, offset, numel)]
                offset += numel + (paddings[g][j] if paddings is not None else 0)
            align = 2 * world  # what zero_to_fp32 checks: both round up to the same multiple
            if -(-offset // align) != -(-sum(sizes) // align):
                raise UserError(f"checkpoint error: {self.tag_dir}: group {g} holds {sum(sizes)} values, its "
                                f"parameters need {offset}; the checkpoint does not match its own layout")

    def _layout_zero3(self, shapes: dict) -> None:
        """ZeRO 3: each parameter is cut into `world` equal pieces (the last padded); rank r holds piece r
        of every parameter, in order, across its groups end to end."""
        world = len(self.flats["weights"])
        sizes = [t.numel() for t in self.flats["weights"][0]]
        offset = 0
        for name, shape in shapes.items():
            self.shapes[name] = torch.Size(shape)
            piece = -(-self.shapes[name].numel() // world)
            self.pieces[name] = [(r, g, start, n) for r in range(world) for g, start, n in _cut(sizes, offset, piece)]
            offset += piece
        if offset != sum(sizes):
            raise UserError(f"checkpoint error: {self.tag_dir}: ranks hold {sum(sizes)} values each, the "
                            f"parameters need {offset}; the checkpoint does not match its own layout")

    def read(self, name: str, key: str) -> torch.Tensor:
        """The full fp32 tensor of one parameter (a fresh copy, not a view of the files)."""
        if self.stage == 0:
            if key == "weights":
                src = self.masters0.get(name, self.model_states["module"][name])
            else:
                src = self.state0[name].get(key)
            if src is None:
                return torch.zeros(self.shapes[name], dtype=torch.float32)
            out = src.to(torch.float32, copy=True).contiguous()
            self._release(src)
            return out
        shape = self.shapes[name]
        out = torch.empty(sum(p[3] for p in self.pieces[name]), dtype=torch.float32)
        pos = 0
        for rank, group, start, numel in self.pieces[name]:
            src = self.flats[key][rank][group].narrow(0, start, numel)
            out.narrow(0, pos, numel).copy_(src)
            self._release(src)
            pos += numel
        return out.narrow(0, 0, shape.numel()).view(shape)

    def _release(self, t: torch.Tensor) -> None:
        if self.mapped:
            release_pages(t)


def stage0_optimizer_state(saved: dict, names: list[str]) -> tuple[dict, dict]:
    """(the torch optimizer's state dict, {name: fp32 master weight}) of a ZeRO-0 model states file. In
    bf16/fp16 DeepSpeed 0.19 wraps the client optimizer in `FP16_UnfusedOptimizer`: its state dict holds the
    torch one under `optimizer_state_dict` and the fp32 masters, in the groups' order, under `fp32_groups`;
    the module holds only their bf16/fp16 rounding. In fp32 the state dict is torch's and the module's
    weights are the masters."""
    if "optimizer_state_dict" not in saved:
        return saved, {}
    masters = [t for group in saved["fp32_groups"] for t in group]
    if len(masters) != len(names):
        raise UserError(f"checkpoint error: {len(masters)} fp32 master weights for {len(names)} parameters; "
                        f"the checkpoint does not match its own layout")
    return saved["optimizer_state_dict"], dict(zip(names, masters))


def _cut(sizes: list[int], offset: int, numel: int) -> list[tuple[int, int, int]]:
    """The range [offset, offset + numel) of a vector made of consecutive blocks of `sizes`, as
    (block index, start in the block, length) pieces."""
    pieces, begin = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(offset, begin), min(offset + numel, begin + size)
        if lo < hi:
            pieces.append((i, lo - begin, hi - lo))
        begin += size
    if sum(p[2] for p in pieces) != numel:
        raise UserError("checkpoint error: a parameter runs past the end of the saved partitions; the "
                        "checkpoint does not match its own layout")
    return pieces


# ------------------------------------------------------------------------------ fill a fresh engine

def optimizer_and_state_keys(engine):
    """The torch optimizer doing the update and the tensors its state is keyed by: the model's parameters
    at stage 0, ZeRO's flat fp32 partitions at stages 1-3 (not its param_groups, which ZeRO swaps in
    only during step())."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # stage 0 in bf16/fp16: FP16_UnfusedOptimizer
        return opt.optimizer, [p for group in opt.fp32_groups for p in group]
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return opt.optimizer, list(opt.single_partition_of_fp32_groups)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return opt.optimizer, list(opt.fp32_partitioned_groups_flat)
    return opt, [p for group in opt.param_groups for p in group["params"]]


def stage0_masters(engine) -> dict[int, torch.Tensor]:
    """id(module parameter) -> the fp32 master DeepSpeed updates in its place at stage 0 in bf16/fp16
    (`FP16_UnfusedOptimizer` keeps them in `fp32_groups`, parallel to `fp16_groups`); empty otherwise."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 0 or not hasattr(opt, "fp32_groups"):
        return {}
    return {id(p): m for low, high in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(low, high)}


def link_optimizer_state(engine) -> None:
    """ZeRO 1/2 link each parameter's fragment to the optimizer state lazily; do it now, so
    `safe_set_full_optimizer_state` can write into it before the first step."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def set_step_counters(engine, global_steps: int, global_samples: int, skipped_steps: int) -> None:
    engine.global_steps = global_steps
    engine.global_samples = global_samples
    engine.skipped_steps = skipped_steps
