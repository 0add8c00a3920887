# Everything a newcomer needs: `make serve` runs the daemon, `make test` runs the suite.
# Both create .venv on first use; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test unit kernel typecheck bench clean

# Only oomkit and its test dependencies go into .venv.  The example third-party plugin
# (examples/protect-file) is not installed: the tests that need it put it on PYTHONPATH for
# their own subprocesses (tests/unit/examples/conftest.py).
#
# A "strict" editable install (a tree of symlinks under build/, on a .pth path) rather than
# the default import hook, which mypy cannot follow: a plugin package type-checks against
# this checkout with no MYPYPATH.  Symlinks follow every edit; a module added or removed
# changes its directory's mtime, which re-runs the install.
$(STAMP): pyproject.toml Makefile oomkit oomkit/sources plugins
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=strict
	touch $(STAMP)

# Set up .venv and do nothing else.
setup: $(STAMP)

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
