# One command each, from a fresh clone: `make demo`, `make test`. Both install first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Torch: a venv that already has torch (your GPU build) keeps it; otherwise this pinned CPU build,
# which pip takes from this machine's disk (an unpinned torch would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
NUM_GPUS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install test test-fast demo resume-demo bench clean

install: $(VENV)/.installed

# The checkout's own modules are byte-compiled too (pip compiles what it installs, not an editable source
# tree): where PYTHONDONTWRITEBYTECODE is set, as on this machine, every process would compile them again.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python -m compileall -q ds_finetune bench tests > /dev/null
	touch $@

test:  ## installs, runs the suite on two workers, and prints the time both took
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=25 tests; code=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s, the install included"; exit $$code

test-fast: install  ## in-process tests only (no DeepSpeed launches)
	$(BIN)/python -m pytest -q tests -m "not multiproc"

demo: install  ## train the tiny config (runs/tiny), then kill a copy of the run, resume it, compare
	$(BIN)/python tools/resume_demo.py --num-gpus $(NUM_GPUS)

resume-demo: install
	$(BIN)/python tools/resume_demo.py --num-gpus $(NUM_GPUS)

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf runs build *.egg-info
