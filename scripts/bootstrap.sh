# Sourced by scripts/demo and scripts/test: make .venv from the lock (requirements/dev.txt).
# Does nothing when .venv already is that lock; scripts/deps.py says what it does, one line a stage.
set -euo pipefail
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "soundfleet needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
"$PY" scripts/deps.py install dev --venv .venv
