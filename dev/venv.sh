# shellcheck shell=bash
# Sourced by dev/test and dev/demo: create .venv and install the package with extra "$1".
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "buildbot-dockerami needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv; installing buildbot-dockerami[$1] and its dependencies (first run: a few minutes)"
    "$PYTHON" -m venv .venv
fi
# pip's progress in short: one line per package it fetches, so a first run is not
# silent; an up-to-date .venv prints two lines. (The grep drops pip's notes about
# unreachable local index mirrors on some machines; pipefail keeps pip's status.)
set -o pipefail
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e ".[$1]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) |
    awk '/^Collecting / { print "   fetching " $2; fflush() }
         /^Installing collected packages:/ { print "   installing " NF - 3 " packages"; fflush() }
         /^Successfully installed/ { print "   installed"; fflush() }'
