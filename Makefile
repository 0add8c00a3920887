# Everything a newcomer needs: `make serve` runs the daemon, `make test` runs the suite.
# Both create .venv on first use; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test unit kernel typecheck bench clean

# The example third-party plugin is installed too: the suite checks that oomkit loads it
# from its entry point and that, unconfigured, it changes no decision.
EXAMPLE_PLUGIN := examples/protect-file

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet -e $(EXAMPLE_PLUGIN)
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/oomkit serve $(ARGS)

test: $(STAMP)
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

unit: $(STAMP)
	$(BIN)/pytest tests/unit $(ARGS)

kernel: $(STAMP)
	$(BIN)/pytest tests/integration $(ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

# Installs the peers and tools it compares against, runs everything, rewrites docs/benchmarks.md.
bench: $(STAMP)
	command -v earlyoom >/dev/null && command -v nohang >/dev/null && command -v cc >/dev/null \
		|| { apt-get update -q && apt-get install -y -q earlyoom nohang gcc; } \
		|| echo "earlyoom, nohang or gcc could not be installed: those rows will say why they are missing"
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install --quiet matplotlib
	$(BIN)/python -m bench.report $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
