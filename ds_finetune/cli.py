"""`ds-finetune`: parses, calls, prints. User errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path

import click

from ds_finetune.errors import UserError


def user_errors_exit(fn):
    """Print a UserError as one line and exit with its code; let bugs keep their traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e.message}", err=True)
            sys.exit(e.exit_code)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Fine-tune causal LLMs on DeepSpeed ZeRO 0-3; stop at any instant, resume exactly."""


# ------------------------------------------------------------------------------------------------ train

@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config_path", metavar="CONFIG")
@click.argument("overrides", nargs=-1, metavar="[key=value ...]")
@click.option("--resume", is_flag=False, flag_value="auto", default=None, metavar="[PATH]",
              help="Resume from the newest complete checkpoint, or from PATH.")
@click.option("--overwrite", is_flag=True, help="Start fresh even if the output dir holds checkpoints (deletes them).")
@click.option("--allow-config-change", is_flag=True, help="Resume even if a setting that breaks exactness changed.")
@click.option("--discard-newer", is_flag=True,
              help="With --resume PATH: move checkpoints newer than PATH aside (never deleted) and branch from PATH.")
@click.option("--num-gpus", type=click.IntRange(min=1), default=None, help="Processes per node.")
@click.option("--num-nodes", type=click.IntRange(min=1), default=None, help="Nodes to use from the hostfile.")
@click.option("--hostfile", type=click.Path(dir_okay=False), default=None, help="DeepSpeed hostfile (`host slots=N`).")
@click.option("--include", default=None, help="DeepSpeed --include, e.g. host1:0,1@host2.")
@click.option("--exclude", default=None, help="DeepSpeed --exclude.")
@click.option("--master-addr", default=None, help="Address of node 0 (rank 0) that every node can reach.")
@click.option("--master-port", type=click.IntRange(1, 65535), default=None, help="Port of rank 0.")
@click.option("--launcher", type=click.Choice(["pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm"],
                                              case_sensitive=False), default=None,
              help="How DeepSpeed starts the hostfile's nodes (default pdsh over ssh).")
@click.option("--no-ssh", is_flag=True, help="Start only this node's ranks; run the command on every node "
                                             "with its --node-rank (see --dry-run).")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="With --no-ssh: this node's index in the hostfile's active nodes (0..N-1).")
@click.option("--dry-run", is_flag=True, help="Print the launcher command and the resolved config, then exit.")
@user_errors_exit
def train(config_path, overrides, resume, overwrite, allow_config_change, discard_newer, num_gpus, num_nodes, hostfile,
          include, exclude, master_addr, master_port, launcher, no_ssh, node_rank, dry_run):
    """Validate CONFIG and run it under the `deepspeed` launcher."""
    from ds_finetune.config import load_config
    from ds_finetune.config_text import split_resume_arg
    from ds_finetune.launcher import (LaunchSpec, build_launch_argv, check_launch_tools, has_accelerator,
                                      launch_env, per_node_launch_argvs, processes_per_host, run_launcher,
                                      world_size_of)
    from ds_finetune.sequence import check_config, layout_line
    from ds_finetune.zero import zero_config_for_run

    resume, overrides = split_resume_arg(resume, overrides)
    cfg = load_config(config_path, overrides)
    spec = LaunchSpec(config_path=config_path, overrides=overrides, resume=resume, overwrite=overwrite,
                      allow_config_change=allow_config_change, discard_newer=discard_newer, num_gpus=num_gpus, num_nodes=num_nodes,
                      hostfile=hostfile, include=include, exclude=exclude, master_addr=master_addr,
                      master_port=master_port, launcher=launcher.lower() if launcher else None, no_ssh=no_ssh,
                      node_rank=node_rank)
    on_accelerator = has_accelerator()
    world = world_size_of(spec, on_accelerator)
    micro, accum, global_batch = cfg.batch_layout(world)
    check_config(cfg)  # what the config alone says about a sequence-parallel layout (the model is not built here)
    if cfg.model.config is not None:  # then transformers' own checks, here rather than on every rank
        from ds_finetune.model import inline_model_config
        inline_model_config(cfg.model)
    from ds_finetune.model import auto_class
    auto_class(cfg)  # a head transformers lacks for the model's type (the reward model's classifier): one line here
    # --no-ssh --dry-run without --node-rank shows every node's command; the first line is node 0's.
    nodes = per_node_launch_argvs(spec, on_accelerator) if no_ssh and dry_run else []
    argv = nodes[0][1] if nodes and node_rank is None else build_launch_argv(spec, on_accelerator)
    # Multi-node: the node we launch from may have no GPU while the workers do; let each node detect its
    # own accelerator (set DS_ACCELERATOR=cpu yourself for CPU-only clusters). With --no-ssh everything
    # this command starts runs here, as on one node.
    cpu_here = not on_accelerator and (not hostfile or no_ssh)
    env = launch_env(not cpu_here)
    prefix = "DS_ACCELERATOR=cpu " if cpu_here else ""
    # Before anything launches: the `deepspeed:` mapping's conflicts with our keys are one line here.
    ds_config = zero_config_for_run(cfg, world, on_gpu=not cpu_here)  # as the ranks will build it
    if not dry_run:
        check_launch_tools(spec)
        # Before the ranks exist: preparing may take longer than DeepSpeed's collective timeout.
        prepare_with_progress(cfg)
    click.echo(prefix + shlex.join(argv))
    if dry_run:
        click.echo(f"# world_size={world} micro_batch_size={micro} grad_accum={accum} global_batch={global_batch}")
        if resume is not None:
            click.echo(resume_preview(cfg, resume))
        if cfg.train.sequence_parallel > 1:
            click.echo(layout_line(cfg.train.sequence_parallel, world, cfg.data.max_length))
        if nodes:
            click.echo(f"# --no-ssh: run on each node its own command (node rank = hostfile order); every node "
                       f"must reach {master_addr}:{master_port or 29500} and see the same output_dir")
            for i, (host, node_argv) in enumerate(nodes):
                click.echo(f"# node {i} ({host}): {prefix}{shlex.join(node_argv)}")
        elif len(hosts := processes_per_host(spec)) > 1:
            click.echo(f"# run once, here: {spec.launcher or 'pdsh'} starts the ranks on {', '.join(hosts)} "
                       f"(same paths on every node; every node must see the same output_dir)")
        click.echo("# resolved run config")
        click.echo(cfg.to_yaml().rstrip())
        click.echo("# DeepSpeed config")
        click.echo(json.dumps(ds_config, indent=2))
        return
    sys.exit(run_launcher(argv, env))


# ------------------------------------------------------------------------------------------------- data

def resume_preview(cfg, resume: str) -> str:
    """--dry-run's line on what --resume would continue from: the newest complete checkpoint (sizes checked,
    not hashes: the ranks verify those), or the path given."""
    from ds_finetune.checkpoint.verify import find_resumable_checkpoint
    if resume != "auto":
        return f"# --resume continues from {resume}"
    info, _ = find_resumable_checkpoint(Path(cfg.checkpoint_dir), hashes=False)
    if info is None:
        return f"# --resume: no complete checkpoint in {cfg.checkpoint_dir} yet; the run starts at step 0"
    return f"# --resume continues from {info.path} at step {info.step}"


def prepare_with_progress(cfg) -> None:
    """Build the run's tokenized-data cache here (each source of a mixture on its own), with a progress bar,
    unless it is there already."""
    from ds_finetune.data import load_tokenizer

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.data.chat_template,
                         **cfg.model.hub_options(for_tokenizer=True))
    sources = cfg.data.source_configs() if cfg.data.is_mixture else [(None, None, cfg.data)]
    for name, _, data_cfg in sources:
        _prepare_one(data_cfg, tok, f"source {name}: " if name else "")


def _prepare_one(data_cfg, tok, label: str) -> None:
    import time

    from tqdm import tqdm

    from ds_finetune.data import ensure_prepared, read_meta
    from ds_finetune.data.sources import estimate_rows

    t0, bar = time.time(), None

    def progress(rows: int, tokens: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=estimate_rows(data_cfg), unit=" rows", desc=f"{label}preparing data", file=sys.stderr,
                       mininterval=0.5, dynamic_ncols=True)
        bar.update(rows - bar.n)
        bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)

    try:
        path, _, built = ensure_prepared(data_cfg, tok, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    meta = read_meta(path)
    what = f"prepared in {time.time() - t0:.1f} s" if built else "ready"
    click.echo(f"{label}data {what}: {meta['rows']:,} rows, {meta['tokens']:,} tokens"
               + (f", {meta['skipped_rows']:,} rows skipped (no target after masking/truncation)"
                  if meta["skipped_rows"] else "")
               + (f", {meta['truncated_pairs']:,} {'prompts' if data_cfg.format == 'prompt' else 'pairs'} truncated "
                  f"(prompt's end kept)" if meta.get("truncated_pairs") else "")
               + f" ({path})", err=True)


@main.group()
def data():
    """Prepare (tokenize and cache) a run's data before training."""


@data.command("prepare")
@click.argument("config_path", metavar="CONFIG")
@click.argument("overrides", nargs=-1, metavar="[key=value ...]")
@user_errors_exit
def data_prepare(config_path, overrides):
    """Tokenize CONFIG's data into the cache the ranks read (what `ds-finetune train` does before launching)."""
    from ds_finetune.config import load_config

    prepare_with_progress(load_config(config_path, list(overrides)))


# ----------------------------------------------------------------------------------------------- config

@main.group()
def config():
    """Generate DeepSpeed configs; describe the run config schema."""


@config.command("zero")
@click.option("--stage", type=click.IntRange(0, 3), required=True, help="ZeRO stage.")
@click.option("--offload-optimizer", type=click.Choice(["none", "cpu"]), default="none")
@click.option("--offload-param", type=click.Choice(["none", "cpu"]), default="none")
@click.option("--bf16", "dtype", flag_value="bf16", help="bf16 mixed precision.")
@click.option("--fp16", "dtype", flag_value="fp16", help="fp16 mixed precision with dynamic loss scaling.")
@click.option("--fp32", "dtype", flag_value="fp32", default=True, help="fp32 (default).")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=1)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1)
@click.option("--world-size", type=click.IntRange(min=1), default=1)
@click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here instead of stdout.")
@user_errors_exit
def config_zero(stage, offload_optimizer, offload_param, dtype, micro_batch_size, grad_accum, world_size,
                grad_clip, output):
    """Write a DeepSpeed JSON config with every value concrete (no "auto")."""
    from ds_finetune.zero import build_zero_config

    text = json.dumps(build_zero_config(stage, micro_batch_size, grad_accum, world_size, dtype, grad_clip,
                                        offload_optimizer, offload_param), indent=2) + "\n"
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@config.command("show-schema")
def config_show_schema():
    """Every run config key with its default and a one-line description."""
    from ds_finetune.config import schema_lines
    click.echo("\n".join(schema_lines()))


# ------------------------------------------------------------------------------------------------- ckpt

@main.group()
def ckpt():
    """Inspect and check checkpoints."""


def _checkpoint_dir_of(run_dir: Path) -> Path:
    """A run's output dir (holding checkpoints/) or a checkpoint dir itself."""
    return run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir


@ckpt.command("list")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-hash", is_flag=True, help="Check sizes only (fast for very large checkpoints).")
@user_errors_exit
def ckpt_list(run_dir, as_json, no_hash):
    """Every checkpoint with step, time, size, ZeRO stage, world size, status; `*` marks what --resume picks."""
    import time as _time

    from ds_finetune.checkpoint.layout import best_checkpoint, tag_dirs
    from ds_finetune.checkpoint.verify import list_checkpoints, manifest_bytes, resume_pick

    ckpt_dir = _checkpoint_dir_of(run_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"{run_dir}: no such run or checkpoint folder")
    total = 0 if no_hash else sum(manifest_bytes(p) for p in tag_dirs(ckpt_dir))
    infos = list_checkpoints(ckpt_dir, hashes=not no_hash, progress=byte_bar("hashing", total))
    pick = resume_pick(infos)
    best = best_checkpoint(ckpt_dir)
    rows = [{"tag": c.tag, "step": c.step, "status": c.status, "size_bytes": c.size,
             "time": c.manifest.get("time") if c.manifest else None,
             "zero_stage": c.manifest.get("zero_stage") if c.manifest else None,
             "world_size": c.manifest.get("world_size") if c.manifest else None,
             "resume_pick": pick is not None and c.path == pick.path, "best_eval": c.path == best,
             "eval_loss": c.manifest.get("trainer_state", {}).get("eval_loss") if c.manifest else None,
             "mix_changed_at": ((c.manifest or {}).get("trainer_state", {}).get("mix") or {}).get("changed_at", []),
             "problems": c.problems} for c in infos]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no checkpoints in {ckpt_dir}")
        return
    click.echo(f"{'':1} {'tag':<16} {'step':>7} {'time':<19} {'size':>10} {'zero':>4} {'world':>5}  status")
    for r in rows:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(r["time"])) if r["time"] else "-"
        click.echo(f"{'*' if r['resume_pick'] else ' '} {r['tag']:<16} {r['step']:>7} {when:<19} "
                   f"{r['size_bytes'] / 2**20:>8.1f}MB {r['zero_stage'] if r['zero_stage'] is not None else '-':>4} "
                   f"{r['world_size'] or '-':>5}  {r['status']}" + ("  (best eval loss)" if r["best_eval"] else "")
                   + (f"  (mix changed at step {', '.join(map(str, r['mix_changed_at']))})"
                      if r["mix_changed_at"] else "")
                   + (f" ({'; '.join(r['problems'])})" if r["status"] in ("corrupt", "unsafe") else ""))
    unsafe = next((r for r in reversed(rows) if r["status"] in ("complete", "unsafe")), None)
    click.echo("* = the checkpoint `--resume` would pick" if pick else
               f"--resume would refuse: {unsafe['tag']} is unsafe to load" if unsafe else
               "--resume would start fresh: nothing complete")


def byte_bar(desc: str, total: int):
    """A progress bar in bytes on stderr where it is a terminal (none in logs); returns its update(n)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return update


@ckpt.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--no-hash", is_flag=True, help="Check sizes only.")
@user_errors_exit
def ckpt_verify(path, no_hash):
    """Check a checkpoint against its manifest; exit 0 only if intact."""
    from ds_finetune.checkpoint.layout import step_of_tag
    from ds_finetune.checkpoint.verify import inspect_checkpoint, manifest_bytes

    if not path.is_dir() or step_of_tag(path.name) is None:
        raise UserError(f"{path}: not a checkpoint folder (expected .../checkpoints/step_N)")
    progress = None if no_hash else byte_bar("hashing", manifest_bytes(path))
    info = inspect_checkpoint(path, hashes=not no_hash, progress=progress)
    if info.status == "complete":
        click.echo(f"{path}: intact ({len(info.manifest['files'])} files, {info.size / 2**20:.1f} MB, "
                   f"step {info.step}, ZeRO {info.manifest['zero_stage']}, world {info.manifest['world_size']})")
        return
    for problem in info.problems:
        click.echo(f"{path}: {problem}", err=True)
    click.echo(f"{path}: {info.status}", err=True)
    sys.exit(1)


@ckpt.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--no-hash", is_flag=True, help="Check sizes only before loading.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest weights file (e.g. 500MB, 2GiB); larger models get several and an index.")
@click.option("--merge", is_flag=True, help="LoRA checkpoints: merge the adapters into the base model.")
@user_errors_exit
def ckpt_export(path, out_dir, dtype, no_hash, max_shard_size, merge):
    """Write a Hugging Face model folder from a checkpoint of any ZeRO stage (a LoRA checkpoint: a PEFT
    adapter folder, or with --merge the merged model)."""
    from ds_finetune.checkpoint.export import HF_DIR, export_checkpoint
    from ds_finetune.lora import is_adapter_checkpoint

    out = export_checkpoint(path, out_dir, dtype, hashes=not no_hash, max_shard_size=max_shard_size, merge=merge,
                            bar=byte_bar)
    if is_adapter_checkpoint(path / HF_DIR) and not merge:
        click.echo(f"exported the adapters of {path} -> {out} ({dtype}); load them with "
                   f"PeftModel.from_pretrained(base_model, {str(out)!r})")
    else:
        architectures = json.loads((out / "config.json").read_text()).get("architectures") or [""]
        auto = ("AutoModelForSequenceClassification" if architectures[0].endswith("ForSequenceClassification")
                else "AutoModelForCausalLM")  # a reward model (train.objective reward)
        click.echo(f"exported {path} -> {out} ({dtype}); load it with {auto}.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
