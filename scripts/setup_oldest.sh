#!/usr/bin/env bash
# A second environment, .venv-oldest, with the oldest transformers release that
# pyproject.toml admits, so the patch tests run on both ends of the declared range
# (scripts/test.sh). Idempotent; prints the transformers version it installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The lower bound of the transformers requirement, as a full release number (5.17 -> 5.17.0).
oldest=$("$PY" - <<'PYEOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
low = re.search(r">=\s*([0-9.]+)", next(d for d in deps if d.startswith("transformers"))).group(1)
print(low + ".0" * (2 - low.count(".")))
PYEOF
)
[ -x .venv-oldest/bin/python ] || "$PY" -m venv .venv-oldest
.venv-oldest/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-oldest/bin/python -m pip install -q "torch==2.13.0"
.venv-oldest/bin/python -m pip install -q -e ".[dev]" "transformers==$oldest"
echo "$oldest"
