# Two commands on a fresh machine: `make demo` (label a folder of generated images) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[ray,test]"
	touch $@

.PHONY: install demo test test-loop
install: $(VENV)/.installed

VOCAB := person; car; dog, puppy; tree [stuff]; sky [stuff]; grass, lawn [stuff]

demo: $(VENV)/.installed
	$(BIN)/fcclip synth images --out demo/images --count 8
	$(BIN)/fcclip label demo/images --out demo/labels --vocab "$(VOCAB)" --model fcclip-tiny --weights random \
		--shard-size 4 --num-cpus 2
	$(BIN)/python examples/label_summary.py demo/labels
	$(BIN)/fcclip predict demo/images/synth_00000.jpg demo/images/synth_00001.jpg --vocab "$(VOCAB)" \
		--model fcclip-tiny --weights random --device cpu --out demo/overlays

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-loop: $(VENV)/.installed  # the round trip alone (it is part of `make test` too)
	$(BIN)/python -m pytest -q -rP --show-capture=stdout -m loop
