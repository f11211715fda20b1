#!/usr/bin/env bash
# Lints what ruff and mypy do not see: the Dockerfile (hadolint), the GitHub workflows
# (actionlint, and zizmor for their security), and the shell scripts (shellcheck).
# Offline: no audit needs the network. Called by .ci/run; uses the tools in .venv/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

echo "hadolint: Dockerfile"
"$bin/hadolint" Dockerfile

echo "actionlint: .github/workflows"
# actionlint runs shellcheck on `run:` blocks when it finds it on PATH.
PATH="$PWD/$bin:$PATH" "$bin/actionlint" .github/workflows/*.yml

echo "zizmor: .github/workflows"
"$bin/zizmor" --offline --quiet .github/workflows

echo "shellcheck: scripts"
shell_scripts=()
for file in scripts/* .ci/run; do
  if [ -f "$file" ] && head -n1 "$file" | grep -Eq '^#!.*\b(ba)?sh\b'; then
    shell_scripts+=("$file")
  fi
done
"$bin/shellcheck" "${shell_scripts[@]}"
echo "lint-infra: all clean"
