# The two commands of the README.
.PHONY: demo test test-fast env

env:
	bash scripts/setup_env.sh test

demo:
	bash launch/demo.sh

# Installs the test dependencies into .venv, then runs the whole suite (CPU, ~26 min on 2 cores; Slurm tests skip without slurmctld).
test: env
	WANDB_MODE=disabled .venv/bin/python -m pytest -q --durations=10 tests

# Without the multi-process DeepSpeed launches.
test-fast: env
	WANDB_MODE=disabled .venv/bin/python -m pytest -q tests -m "not distributed"
