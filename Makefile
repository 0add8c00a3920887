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

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
