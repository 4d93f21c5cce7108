# Two commands do everything: `make demo` (the main job) and `make test` (the test suite).
# Each creates the virtual environment .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a matching pair; override for your platform, e.g.
#   make TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" demo
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
KERNEL := wsss

.PHONY: demo test figures results lab clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (wsss .venv)"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m wsss demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

figures: $(VENV)/.installed
	$(PY) -m wsss.notebooks run notebooks/experiments/ablation_demo.yaml
	$(PY) -m wsss.notebooks run notebooks/experiments/figures.yaml --force

# Every run behind docs/results.md (hours on two cores; resumes where it stopped), then its tables and figures.
results: $(VENV)/.installed
	PY=$(PY) benchmarks/results.sh

# Jupyter refuses to run as root without --allow-root (the usual case in a container).
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)

clean-venv:
	rm -rf $(VENV)
