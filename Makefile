# One command each: `make demo` (set up + run the demo), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
# The torch build we test with; override e.g. TORCH_SPEC="torch torchvision" for the newest.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_WEIGHTS ?= imagenet

.PHONY: venv demo test test-deps bench-cpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/python -m pipeline.demo --weights $(DEMO_WEIGHTS)

# Programs the tests start besides Python: a Java runtime for Spark (tests/test_engines.py) and
# Azurite, the Azure Storage emulator (tests/test_clouds.py). Installed only when missing; apt-get
# needs root, as CI runs on Debian. man1 must exist for the JRE's postinst on slim images.
test-deps:
	@command -v java >/dev/null || { mkdir -p /usr/share/man/man1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }
	@command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; }
	@command -v azurite-blob >/dev/null || npm install -g --no-fund --no-audit azurite

test: venv test-deps
	$(VENV)/bin/python -m pytest -q

bench-cpu: venv  # docs/benchmarks.md: end to end vs the bare model and vs a plain torchvision fp32 loop
	$(VENV)/bin/python benchmarks/end_to_end.py --compare-model-only --compare-torchvision --repeat 3

clean:
	rm -rf $(VENV) demo-output .pytest_cache
