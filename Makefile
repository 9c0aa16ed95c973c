# Two commands on a fresh machine: `make demo` (label a folder of generated images) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[ray,test]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fcclip synth images --out demo/images --count 4
	$(BIN)/fcclip predict demo/images/*.jpg --vocab "person; car; dog, puppy; tree [stuff]; sky [stuff]; grass, lawn [stuff]" \
		--model fcclip-tiny --weights random --device cpu --out demo/out
	@echo "overlays: demo/out/*_overlay.png"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q
