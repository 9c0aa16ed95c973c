# Two commands on a fresh machine: `make demo` (label a folder of generated images) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[ray,test,review]"
	touch $@

# Label Studio in its own environment (it pins Django and many others): tests/test_review.py starts it from here
LABEL_STUDIO_VERSION := 1.23.2
LS_VENV := .venv-ls
$(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install "label-studio==$(LABEL_STUDIO_VERSION)"
	touch $@

.PHONY: install install-label-studio demo test test-loop
install: $(VENV)/.installed
install-label-studio: $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)

VOCAB := person; car; dog, puppy; tree [stuff]; sky [stuff]; grass, lawn [stuff]

demo: $(VENV)/.installed
	$(BIN)/fcclip synth images --out demo/images --count 8
	$(BIN)/fcclip label demo/images --out demo/labels --vocab "$(VOCAB)" --model fcclip-tiny --weights random \
		--shard-size 4 --num-cpus 2
	$(BIN)/python examples/label_summary.py demo/labels
	$(BIN)/fcclip predict demo/images/synth_00000.jpg demo/images/synth_00001.jpg --vocab "$(VOCAB)" \
		--model fcclip-tiny --weights random --device cpu --out demo/overlays

test: $(VENV)/.installed $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)
	$(BIN)/python -m pytest -q

test-loop: $(VENV)/.installed  # the round trip alone (it is part of `make test` too)
	$(BIN)/python -m pytest -q -rP --show-capture=stdout -m loop
