#!/usr/bin/env bash
# Mutation testing of the modules where a silent fault trains the wrong objective (the list is
# [tool.mutmut] only_mutate in pyproject.toml; each mutant runs the tests that cover it).
#   bash scripts/mutation.sh ["oisd_lab.losses* oisd_lab.step*"] [workers]
# The first argument selects mutants by name, one or more patterns separated by spaces (default:
# all of them); the score and every surviving
# mutant's diff go to reports/mutation/latest.md (the runs so far: reports/mutation/README.md). Needs
# the mutation extra (mutmut).
set -u
pattern=${1:-}
workers=${2:-2}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
start=$(date +%s)
read -r -a patterns <<< "$pattern"
mutmut run --max-children "$workers" "${patterns[@]}"
python scripts/mutation_report.py --seconds $(( $(date +%s) - start )) --workers "$workers" --pattern "${patterns[@]}"
