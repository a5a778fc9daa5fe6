# Two commands on a fresh machine (see README):  `make train`  and  `make test`.
# Both are idempotent: the virtual environment is built once and reused.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup train train-full test bench clean

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

# The main job: HF-softmax on the built-in synthetic identities, then random sampling at the same M,
# ending with both side by side (held-out verification, top-1 over all K, CPK, speed).
# Rerunning it starts afresh (train.overwrite=true); ARGS="[dataset_path] key=value ..." adds to both.
train: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh scripts/demo.sh $(ARGS) train.overwrite=true

# Full-softmax baseline on the same data.
train-full: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh scripts/train.sh $(ARGS) train.overwrite=true

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

test: setup $(TEST_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs outputs
