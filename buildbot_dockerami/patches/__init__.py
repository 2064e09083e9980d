"""Process-wide patches of buildbot and CPython, installed in one place."""
