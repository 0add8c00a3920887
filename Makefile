# Everything a newcomer needs: `make serve` runs the daemon, `make test` runs the suite.
# Both create .venv on first use; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test unit kernel guest terminal typecheck bench bench-quick bench-tools clean

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

test: $(STAMP) guest terminal
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

unit: $(STAMP) terminal
	$(BIN)/pytest tests/unit $(ARGS)

kernel: $(STAMP) guest
	$(BIN)/pytest tests/integration $(ARGS)

# The guest kernel the cgroup v2 tests run in (tests/guest): QEMU and a static busybox from
# Debian's packages, installed only when missing, and a linux-image-6.1 package fetched with
# apt-get download into .cache/guest (never installed).  Once cached, nothing here touches
# the network.  Where any of it cannot be had, the guest tests skip and say why.
guest: $(STAMP)
	@command -v qemu-system-x86_64 >/dev/null && dpkg -s busybox-static >/dev/null 2>&1 \
		|| { command -v apt-get >/dev/null && apt-get update -q \
			&& apt-get install -y -q --no-install-recommends qemu-system-x86 busybox-static; } \
		|| echo "make guest: qemu-system-x86 and busybox-static could not be installed: the guest tests will skip"
	@$(BIN)/python -m tests.guest prepare || echo "make guest: the guest tests will skip"

# tmux, the real terminal `oomkit top --watch` is tested in (tests/terminal.py), from
# Debian's packages when missing; without it those tests skip and say why.
terminal:
	@command -v tmux >/dev/null \
		|| { command -v apt-get >/dev/null && apt-get update -q && apt-get install -y -q --no-install-recommends tmux; } \
		|| echo "make terminal: tmux could not be installed: the live-view tests will skip"

typecheck: $(STAMP)
	$(BIN)/mypy

# Installs the peers and tools it compares against, runs everything, rewrites docs/benchmarks.md
# (its header says what each section costs: 16 to 47 minutes on this 2-core machine, by load).
bench: bench-tools
	$(BIN)/python -m bench.report $(ARGS)

# The decision path with fewer runs, sizes and rounds (bench/report.py QUICK, a few minutes);
# prints the tables and leaves docs/benchmarks.md alone.
bench-quick: bench-tools
	$(BIN)/python -m bench.report --quick

bench-tools: $(STAMP)
	command -v earlyoom >/dev/null && command -v nohang >/dev/null && command -v cc >/dev/null \
		|| { apt-get update -q && apt-get install -y -q earlyoom nohang gcc; } \
		|| echo "earlyoom, nohang or gcc could not be installed: those rows will say why they are missing"
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install --quiet matplotlib

clean:
	rm -rf $(VENV) build *.egg-info .cache/guest
