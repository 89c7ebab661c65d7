# lmfoundry: `make demo` runs the pipeline on the embedded default, `make test` passes the suite.
# Both set everything up first and are idempotent (a second run reuses the environment).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test bench system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium drives the browser test of the Prefect UI; WordNet (wordnet-base) feeds the
# augment stage's synonyms (root on CI; skipped if present)
system-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	@test -f /usr/share/wordnet/data.noun || (apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null)

demo: setup
	$(VENV)/bin/lmf run --config configs/demo.yaml
	$(VENV)/bin/lmf status --config configs/demo.yaml

test: setup system-deps
	$(PY) -m pytest tests

$(VENV)/.bench: $(STAMP)
	$(PIP) -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	@for b in $$(ls bench/*.py | xargs -n1 basename | sed 's/\.py$$//' | grep -v '^_'); do \
		echo "== lmf bench $$b"; $(VENV)/bin/lmf bench $$b || exit 1; done

clean:
	rm -rf .lmf
