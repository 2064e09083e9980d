# shellcheck shell=bash
# Sourced by dev/test and dev/demo: create .venv and install the package with extra "$1".
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "buildbot-dockerami needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# (The grep drops pip's notes about unreachable local index mirrors on some machines.)
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
