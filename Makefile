# Two commands for newcomers: `make demo` and `make test`. Both prepare what they need first:
#   .venv with the ROS 2 Kilted wheels, torch, timm, open3d, ... (requirements.txt)
#   the Debian library open3d needs (libusb-1.0-0)
#   the rosidl build of msg/ into .venv (importable as mafr_ros.msg with nothing sourced)
#   the mafr_ros package itself (editable) and its `mafr` command
# Each step leaves a stamp file in .venv and is redone only when its inputs change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ABS_VENV = $(abspath $(VENV))

# Every ROS process started by these targets stays on this machine (no multicast on the network) and
# in a domain of its own. A real cell keeps the ROS defaults (see README).
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export ROS_DOMAIN_ID ?= $(shell echo $$(( $$$$ % 90 + 10 )))
export PYTHONDONTWRITEBYTECODE = 1

STAMP_DEPS := $(VENV)/.stamp-deps
STAMP_MSGS := $(VENV)/.stamp-msgs
STAMP_PKG  := $(VENV)/.stamp-pkg
MSG_FILES  := $(wildcard msg/*.msg)

.PHONY: setup test test-fast demo bench model clean distclean

setup: $(STAMP_DEPS) $(STAMP_MSGS) $(STAMP_PKG)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP_DEPS): requirements.txt requirements-python.txt | $(PY)
	@if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
	  echo "installing libusb-1.0-0 (open3d needs libusb-1.0.so.0)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: open3d needs the Debian package libusb-1.0-0; install it as root" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libusb-1.0-0; \
	fi
	$(PIP) install --quiet -r requirements.txt
	touch $@

# rosidl build of msg/ with plain CMake: the libraries land in .venv/lib (which the ROS wheels'
# start-up hook puts on LD_LIBRARY_PATH) and the Python module in .venv/lib/mafr_ros_msgs
# (which mafr_ros/__init__.py adds to the package path).
$(STAMP_MSGS): $(STAMP_DEPS) $(MSG_FILES) CMakeLists.txt package.xml
	rm -rf build/msgs && mkdir -p build
	AMENT_PREFIX_PATH=$(ABS_VENV) CMAKE_PREFIX_PATH=$(ABS_VENV) cmake -S . -B build/msgs \
	  -DMAFR_INSTALL_PYTHON=OFF -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(ABS_VENV)/bin/python -DCMAKE_INSTALL_PREFIX=$(ABS_VENV) \
	  -DPYTHON_INSTALL_DIR=lib/mafr_ros_msgs > build/msgs.log 2>&1 || (cat build/msgs.log; exit 1)
	AMENT_PREFIX_PATH=$(ABS_VENV) cmake --build build/msgs -j2 >> build/msgs.log 2>&1 || (tail -50 build/msgs.log; exit 1)
	cmake --install build/msgs >> build/msgs.log 2>&1 || (tail -50 build/msgs.log; exit 1)
	touch $@

$(STAMP_PKG): $(STAMP_DEPS) setup.py
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest test

# The same without the slow (multi-minute) tests.
test-fast: setup
	$(PY) -m pytest test -m "not slow"

demo: setup
	$(VENV)/bin/mafr demo --out demo_out

bench: setup
	$(PY) bench/plumbing.py

clean:
	rm -rf build demo_out .pytest_cache

distclean: clean
	rm -rf $(VENV)

# Rebuild the embedded default model (models/lite_synthetic.safetensors) from scratch:
# synthetic parts of seed 0, lite profile with its defaults (standardised features, per-pixel MSE,
# 50 epochs of 32 px crops, lr 2e-3 cosine; see mafr_ros/core/profiles.py), seed 115.
# About 20 minutes on the shared 2-core CPU (models/lite_synthetic.md).
model: setup
	$(VENV)/bin/mafr synth --out build/model_data --seed 0 --categories gland
	$(VENV)/bin/mafr train --dataset build/model_data --category gland --profile lite \
	  --seed 115 --cache-dir build/model_cache --out models/lite_synthetic.safetensors
	$(VENV)/bin/mafr eval --dataset build/model_data --category gland --cache-dir build/model_cache \
	  --checkpoint models/lite_synthetic.safetensors --record
