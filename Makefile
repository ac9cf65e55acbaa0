# Every target builds .venv from the package files first; nothing is assumed installed but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test vm-test bench chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdm-peer demo

# The dashboard test looks through Debian's headless chromium. Installed here when it is missing
# and root can (apt-get); if not, that test says why: a skip, or a failure under CI=true.
CHROMIUM := /usr/bin/chromium
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		$(APT_INSTALL) || { apt-get update -q && $(APT_INSTALL); } \
			|| echo "could not install chromium: the dashboard's browser test will say so"; \
	else \
		echo "chromium is missing and installing it needs root and apt-get: the dashboard's browser test will say so"; \
	fi

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Compute Engine in a box (tests/vm/, README "vm-test"): real VMs under QEMU boot the cloud-configs.
# Installs QEMU, mmdebstrap and e2fsprogs as root with apt-get when missing; fails, never skips,
# where they cannot be had or QEMU cannot run.
VM_TOOLS := qemu-system-x86 mmdebstrap e2fsprogs
VM_APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(VM_TOOLS)
vm-test: $(STAMP)
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v mmdebstrap >/dev/null \
			|| ! command -v mkfs.ext4 >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			$(VM_APT_INSTALL) || { apt-get update -q && $(VM_APT_INSTALL); }; \
		else \
			echo "vm-test needs $(VM_TOOLS), and installing them needs root and apt-get"; exit 1; \
		fi; \
	fi
	$(BIN)/python -m pytest -p no:cacheprovider tests/vm $(PYTEST_ARGS)

# The bench-only dependencies (the peers it measures against, psutil): setup.cfg's `bench` extra.
$(BENCH_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

# Quick mode (about 4 minutes on 2 cores); `make bench FULL=1` for the long one.
# Prints a markdown table and writes bench/results.json.
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(if $(filter-out 0 no false,$(FULL)),--full)

# The long chaos run (tests/chaos.py): faults for DURATION seconds, then its invariants and figures.
# SEED defaults to a new one, printed; `make chaos SEED=7 DURATION=600` repeats a schedule.
DURATION ?= 300
SEED ?=
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --duration $(DURATION) $(if $(SEED),--seed $(SEED))

clean:
	rm -rf $(VENV) sdm-demo .pytest_cache *.egg-info
