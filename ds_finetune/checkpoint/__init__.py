"""Checkpoints, one concern in one package: `layout` (tags, the manifest, retention), `commit` (a save and its
commit), `manager` (the Checkpointer the loop calls; it also loads), `async_save` (background writes),
`verify` (a checkpoint's status before anything is loaded), `safe_pickle` (the loader that runs no code),
`resume` (choosing, checking and converting a checkpoint), `reshard` (the stage- and world-size-free copy,
with `tensorfiles`), `export` (a Hugging Face or PEFT folder) and `ds_internals` (the DeepSpeed private API
these use).

Commit protocol: every rank writes its DeepSpeed files into `DIR/step_N/`, fsyncs and hashes the files
it owns, and sends the list to rank 0; rank 0 writes `manifest.json` to a temp name, fsyncs it, renames it
into place and fsyncs the folder. **The manifest's presence is the commit.** Only then is `DIR/latest`
replaced (temp + fsync + rename; same format as DeepSpeed's so its tools still work) and are old
checkpoints purged. Resume never trusts `latest`: it scans manifests, newest first, and verifies sizes
and sha256 before anything is unpickled; every load, DeepSpeed's included, goes through torch's safe
unpickler (`checkpoint/ds_internals.load_checkpoint_file`), so a crafted file cannot run code.
"""
