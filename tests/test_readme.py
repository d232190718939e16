"""README.md stays true: every config key is documented there, and the two commands are the Makefile's."""
from pathlib import Path

from ds_finetune.config import schema_lines

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_lists_every_key_with_its_description():
    readme = (ROOT / "README.md").read_text()
    for line in schema_lines():
        key, rest = line.split(" (default ", 1)
        default, description = rest.split("): ", 1)
        row = f"| `{key}` | {default} | {description.replace('|', chr(92) + '|')} |"
        assert row in readme, f"README config reference is out of date for {key}: expected {row!r}"


def test_readme_names_the_commands_the_makefile_and_ci_run():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo: install" in makefile and "\ntest: install" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_example_configs_validate_with_dry_run():
    import subprocess
    import sys
    cli = str(Path(sys.executable).with_name("ds-finetune"))
    for argv in (["configs/qwen2.5-0.5b-sft-zero2.yaml", "--num-gpus", "8"],
                 ["configs/llama3-8b-zero3-offload.yaml", "--hostfile", "configs/hostfile.example"]):
        proc = subprocess.run([cli, "train", *argv, "--dry-run"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "deepspeed" in proc.stdout.splitlines()[0]
    proc = subprocess.run([cli, "train", "configs/llama3-8b-zero3-offload.yaml", "--hostfile",
                           "configs/hostfile.example", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert "world_size=16 micro_batch_size=1 grad_accum=4 global_batch=64" in proc.stdout
