# One command each: `make demo` (set up + run the demo), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
# The torch build we test with; override e.g. TORCH_SPEC="torch torchvision" for the newest.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_WEIGHTS ?= imagenet

.PHONY: venv demo test bench-cpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/python -m pipeline.demo --weights $(DEMO_WEIGHTS)

test: venv
	$(VENV)/bin/python -m pytest -q

bench-cpu: venv  # docs/benchmarks.md: end to end vs the bare model and vs a plain torchvision fp32 loop
	$(VENV)/bin/python benchmarks/end_to_end.py --compare-model-only --compare-torchvision --repeat 3

clean:
	rm -rf $(VENV) demo-output .pytest_cache
