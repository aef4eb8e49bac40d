# One-command set-up: every target below creates .venv and installs tokensieve with the pinned versions of
# constraints/ci.txt the first time (torch 2.14.1 + torchvision 0.29.1 come from the machine's local wheel store).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

$(STAMP): pyproject.toml constraints/ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/ci.txt -e ".[dev]"
	# test oracle only: Triton's ModelConfig proto checks the configs `tokensieve triton` writes (tritonclient pins
	# protobuf < 7 and ml-dtypes <= 0.5.4 for its network clients, which onnx's pins exclude; the proto needs neither)
	$(PY) -m pip install --quiet --no-deps -c constraints/ci.txt tritonclient
	touch $(STAMP)

.PHONY: setup demo test check bench-topk
setup: $(STAMP)

# Main job: export ViT-B/16 with top-k pruning inside the graph, check parity, print the speed table (ORT CPU).
demo: $(STAMP)
	$(VENV)/bin/tokensieve export timm:vit_base_patch16_224 --method "topk(keep=0.7, layers=[3,6,9])" \
		--dynamic-batch --out runs/vit_base_topk
	$(VENV)/bin/tokensieve parity runs/vit_base_topk
	$(VENV)/bin/tokensieve lint runs/vit_base_topk --target trt10.3
	$(VENV)/bin/tokensieve bench runs/vit_base_topk --batch 1 8

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check tokensieve tests benchmarks examples
	$(VENV)/bin/ruff format --check tokensieve tests benchmarks examples

bench-topk: $(STAMP)
	$(PY) benchmarks/bench_topk_vit.py
