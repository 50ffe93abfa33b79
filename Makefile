# make demo: set up .venv and train + test MCAN on the bundled easy-VQA data.
# make test: set up .venv and run the test suite.
# make docs: regenerate docs/config.md (every config key) from the code.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ifndef DEMO_VERSION
DEMO_VERSION := demo-$(shell date +%Y%m%d-%H%M%S)
endif
CONFIG ?= configs/easyvqa.yml

.PHONY: demo test setup clean-venv docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(BIN)/accuvqa prepare --config $(CONFIG)
	$(BIN)/accuvqa train --config $(CONFIG) --VERSION $(DEMO_VERSION)
	$(BIN)/accuvqa test --config $(CONFIG) --VERSION $(DEMO_VERSION)
	$(BIN)/accuvqa plot --config $(CONFIG) --VERSION $(DEMO_VERSION)

test: setup
	$(BIN)/python -m pytest -q

docs: setup
	$(BIN)/python -m accuvqa.config_doc > docs/config.md

clean-venv:
	rm -rf $(VENV)
