#!/usr/bin/env bash
# Mutation testing of the modules that carry AMOS's mechanism (TESTING.md), with mutmut 3 as configured in setup.cfg's
# [mutmut] section. Not part of CI: about an hour or two on 2 cores. Install with `pip install -e '.[mutation]'`.
#   bash bench/mutation.sh                                  # every mutant; results in mutants/, summary printed
#   bash bench/mutation.sh 'amos_ds.data.masking*'          # the mutants of one module (mutmut's name globs)
#   MUTATION_JOBS=1 bash bench/mutation.sh                  # one test process at a time (default 2)
# Afterwards: `mutmut results` lists survivors, `mutmut show NAME` prints one mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
# amos_kernels is kernels/ under its import name (setup.cfg package_dir); mutmut puts the mutated amos_ds (mutants/)
# first on sys.path, and the kernels come from this link, never from an installed copy of the project.
link=$(mktemp -d)
trap 'rm -rf "$link"' EXIT
ln -s "$PWD/kernels" "$link/amos_kernels"
# One thread per test process: mutmut runs --max-children of them side by side.
export PYTHONPATH="$link" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TRITON_INTERPRET=1
nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "$@"
# Per module: how many mutants were killed, survived, timed out, had no test, or were not checked in this run.
mutmut results --all true | awk -F': ' '{ name = $1; gsub(/^ +/, "", name); module = substr(name, 1, index(name, ".x") - 1)
    count[module ": " $2]++ } END { for (key in count) print key, count[key] }' | sort
