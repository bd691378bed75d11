#!/usr/bin/env bash
# Sets up everything deit3-fast needs on a Debian/Ubuntu machine, from nothing, idempotently:
#   1. system packages (compilers and headers that ffcv builds against),
#   2. a virtual environment in .venv,
#   3. `pip install -e .[all]` (torch, timm, ffcv, DALI, test and lint tools).
# Each step checks first and says whether it is skipping. Re-run after editing setup.cfg: the stamp notices.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-all}
STAMP="$VENV/.deit3-installed-$EXTRAS"
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

# ---- 1. system packages --------------------------------------------------------------------------------------
# Checked by what the build needs (a command, a pkg-config module, a header), not by package name, so a machine
# that has them from elsewhere (pyenv Python, a conda g++) is left alone.
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists libturbojpeg; then missing+=(libturbojpeg0-dev); fi
if ! command -v pkg-config >/dev/null 2>&1 || ! { pkg-config --exists opencv4 || pkg-config --exists opencv; }; then
  missing+=(libopencv-dev)
fi
# opencv-python (required by ffcv) loads libGL and glib at import time. A library is there when the loader's cache
# lists it or, where that cache is stale or ldconfig is not on a user's PATH (containers that unpack packages without
# running ldconfig: CI once found libgthread installed but unlisted and went to reinstall it), when a file of that
# name is in the system's library folders.
have_lib() {
  { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q "$1" && return 0
  [ -n "$(find /lib /lib64 /usr/lib /usr/lib64 /usr/local/lib -maxdepth 3 -name "$1*" -print -quit 2>/dev/null)" ]
}
have_lib 'libGL.so.1' || missing+=(libgl1)
have_lib 'libgthread-2.0.so.0' || missing+=(libglib2.0-0)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv python3-dev)
else
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  python3 -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
    >/dev/null 2>&1 || missing+=(python3-dev)
fi

if ((${#missing[@]})); then
  say "installing system packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "error: system packages missing (${missing[*]}) and not root without sudo; install them with apt-get and re-run" >&2
      exit 2
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "system packages: present (g++, pkg-config, libturbojpeg, OpenCV, python3-venv)"
fi

# ---- 2. virtual environment ----------------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
  say "virtual environment: $VENV exists"
else
  say "creating virtual environment in $VENV"
  python3 -m venv "$VENV"
fi

# ---- 3. Python packages --------------------------------------------------------------------------------------
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.cfg ] && [ "$STAMP" -nt pyproject.toml ]; then
  say "python packages: up to date ($STAMP newer than setup.cfg)"
else
  say "installing python packages: pip install -e .[$EXTRAS] (first time: torch and DALI are several GB, a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  # Import what was installed now, so a broken build shows here rather than in the first test.
  "$VENV/bin/python" - "$EXTRAS" <<'PY'
import importlib, sys
names = ["torch", "torchvision", "timm", "numba", "rich", "submitit"]
if sys.argv[1] == "all":
    names += ["ffcv", "nvidia.dali", "pytest", "xdist", "tensorboard", "mypy"]
for name in names:
    importlib.import_module(name)
print("[bootstrap] imports ok:", ", ".join(names))
PY
  touch "$STAMP"
fi
