#!/usr/bin/env bash
# Mutation testing of the modules where a silent fault trains the wrong objective (the list is
# [tool.mutmut] only_mutate in pyproject.toml; each mutant runs the tests that cover it).
#   bash scripts/mutation.sh ["oisd_lab.losses* oisd_lab.step*"] [workers] [fraction]
# The first argument selects mutants by name, one or more patterns separated by spaces (default:
# all of them). With a fraction in (0, 1], the run checks a seeded sample of that share of each
# module's mutants (at least one) and the report gives each score's 95% interval (every module at
# 0.12: about 90 minutes on 2 cores, a third of it mutmut's set-up). The score and every surviving mutant's diff go to
# reports/mutation/latest.md (the runs so far: reports/mutation/README.md). Needs the mutation
# extra (mutmut).
set -u
pattern=${1:-}
workers=${2:-2}
fraction=${3:-}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
start=$(date +%s)
read -r -a patterns <<< "$pattern"
if [ -z "$fraction" ]; then
    mutmut run --max-children "$workers" "${patterns[@]}"
    python scripts/mutation_report.py --seconds $(( $(date +%s) - start )) --workers "$workers" --pattern "${patterns[@]}"
    exit
fi
# Generate the mutants and the per-test coverage (the filter matches no mutant, so nothing runs yet).
mutmut run --max-children "$workers" "oisd_lab.no_such_module.x_none" > /dev/null 2>&1 || true
mkdir -p mutants
python scripts/mutation_report.py --pattern "${patterns[@]}" --sample "$fraction" --sample-out mutants/sample.txt
mapfile -t chosen < mutants/sample.txt
mutmut run --max-children "$workers" "${chosen[@]}"
python scripts/mutation_report.py --seconds $(( $(date +%s) - start )) --workers "$workers" \
    --pattern "${patterns[@]}" --only mutants/sample.txt --sample "$fraction"
