# The two commands of the README quick start. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/predator_prey_quick

.PHONY: run test venv sweep bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Quick Predator-Prey experiment end to end (data, autoencoder, L_z vs L_x,p, rollouts).
run: $(STAMP)
	$(PY) experiments/train.py --config configs/predator_prey.py:quick --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The full Predator-Prey budget sweep (about two hours in one process on 2 cores; see
# docs/results.md for the two-process split that took 65 minutes); writes docs/results/.
sweep: $(STAMP)
	$(PY) experiments/sweep.py --config configs/predator_prey.py --workdir workdirs/predator_prey_sweep --out docs/results/predator_prey.json

# Every benchmark (about 25 minutes on 2 cores); JSON in benchmarks/results/.
bench: $(STAMP)
	$(PY) benchmarks/train_step.py --out benchmarks/results/train_step_cpu.json
	XLA_FLAGS=--xla_cpu_multi_thread_eigen=false $(PY) benchmarks/train_step.py --out benchmarks/results/train_step_cpu_1thread.json
	$(PY) benchmarks/partial_forces.py --out benchmarks/results/partial_forces_cpu.json
	$(PY) benchmarks/lj_train_step.py --out benchmarks/results/lj_train_step_cpu.json
	$(PY) benchmarks/pinv_rows.py --out benchmarks/results/pinv_rows_cpu.json

clean:
	rm -rf workdirs .pytest_cache
