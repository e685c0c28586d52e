#!/usr/bin/env bash
# Set up (or reuse) the virtual environment .venv/ for stablemtl.
#
#   ./setup.sh          runtime dependencies + the package (editable)
#   ./setup.sh --test   the same plus the test dependencies (and Chromium, as root with apt-get)
#
# PyTorch is installed first and on purpose: without an NVIDIA GPU we install
# the CPU build (a plain `pip install torch` on Linux pulls several GB of CUDA
# libraries); with a GPU (nvidia-smi lists one) the default CUDA build.
# Overrides: PYTHON (interpreter, >= 3.11), TORCH_VERSION (default 2.13.0 for
# the CPU build, unpinned for CUDA), TORCH_CPU_INDEX (extra index for CPU
# wheels), STABLEMTL_FORCE_CPU=1 (CPU build even with a GPU).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or
# constraints.txt changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")"

extras=""
for arg in "$@"; do
    case "$arg" in
        --test) extras="[test]" ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (expected --test or nothing)" >&2; exit 2 ;;
    esac
done

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: '$python' is missing or older than Python 3.11; set PYTHON=/path/to/python3.11+" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "[setup] torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed, kept"
elif [ "${STABLEMTL_FORCE_CPU:-0}" != "1" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "${pip[@]}" install "torch${TORCH_VERSION:+==$TORCH_VERSION}"
else
    version="${TORCH_VERSION:-2.13.0}"
    index="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch==$version"
    # few retries: an unreachable extra index (offline mirrors) must not stall every dependency
    "${pip[@]}" install --retries 1 "torch==$version" ${index:+--extra-index-url "$index"}
fi

# The stamp records what the last successful install saw; an install with the
# test extras also satisfies a plain ./setup.sh.
stamp=".venv/.stablemtl-setup"
digest="$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest()[:16])' pyproject.toml constraints.txt)"
have="$(cat "$stamp" 2>/dev/null || true)"
if { [ "$have" = "$digest$extras" ] || [ "$have" = "$digest[test]" ]; } && .venv/bin/python -c 'import stablemtl' 2>/dev/null; then
    echo "[setup] .venv is up to date"
else
    echo "[setup] installing stablemtl$extras and its dependencies"
    "${pip[@]}" install -c constraints.txt -e ".$extras"
    echo "$digest$extras" > "$stamp"
fi
# The browser test (tests/test_notebooks_browser.py) drives the system's Chromium; install it where
# the machine allows (root with apt-get, Debian's `chromium`), otherwise that test is skipped with the reason.
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Chromium (apt-get) for the browser test"
        if ! { timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
               || { timeout 300 apt-get update -q >/dev/null 2>&1 \
                    && timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; then
            echo "[setup] could not install Chromium; the browser test will be skipped" >&2
        fi
    else
        echo "[setup] Chromium not found (install Debian's 'chromium' package for the browser test; it is skipped otherwise)"
    fi
fi
echo "[setup] done: $(.venv/bin/python -c 'import stablemtl, torch; print("stablemtl", stablemtl.__version__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available())')"
