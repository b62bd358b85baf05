#!/usr/bin/env bash
# Refreshes the lock files from setup.cfg: run it after changing a dependency, or to take newer releases.
#
#   python3 -m pip install uv && bash requirements/refresh.sh
#
# One universal resolution (every interpreter, Python 3.11 and later) is made for the service with its test
# extra; the service's own resolution is constrained to it, so the tests and the image run the same versions.
# - test.txt: the service and its test extra, pinned, with environment markers and without hashes. It is a
#   constraints file (`pip install -c requirements/test.txt '.[test]'`); pip refuses hashes in a constraints
#   file when the project itself is installed from a directory.
# - <implementation><major><minor>.txt (cpython311.txt, pypy311.txt, ...): the service alone, for exactly one
#   interpreter, every line applying to it, with the sha256 of every file PyPI has of each version. The
#   Dockerfile installs from the one matching its interpreter with --require-hashes.
# - build.txt: pyproject.toml's build system, pinned with hashes, which the Dockerfile builds the project's wheel with.
set -euo pipefail
cd "$(dirname "$0")/.."

# Ask PyPI itself, whatever index a pip configuration on this machine names.
export UV_INDEX_URL=https://pypi.org/simple UV_NO_CONFIG=1
compile=(uv pip compile --quiet --universal --python-version 3.11 --no-header --no-annotate)

"${compile[@]}" --extra test setup.cfg -o requirements/test.txt
universal="$(mktemp)"
trap 'rm -f "$universal"' EXIT
"${compile[@]}" --generate-hashes --constraint requirements/test.txt setup.cfg -o "$universal"
uv run --quiet --no-project --with packaging python3 requirements/split.py "$universal" requirements \
    cpython311 cpython312 cpython313 cpython314 pypy311
# build.txt: the build system of pyproject.toml (pure Python, for every interpreter), with hashes: the image builds
# the project's own wheel with it, not with whatever pip's build isolation would fetch.
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
    > "$universal"
"${compile[@]}" --generate-hashes "$universal" -o requirements/build.txt
