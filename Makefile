# Two entry points that work on a fresh machine: `make main` (the first run: fine-tune and compare, offline) and
# `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup main test lint mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the release this machine carries as a CPU wheel; the package's own range (torch>=2.6)
# is then already satisfied, so pip does not pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

main: setup
	$(BIN)/python scripts/first_run.py $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check src tests scripts experiments

# Mutation testing of the routing, the losses and Last Layer Fusion (minutes to tens of minutes; not run in CI):
# every function of routing_cropr_vit.py, and the loss functions, `strip_training_modules`, the backbone's routing
# steps (`_start_routing`, `_prune`) and the task heads' losses of modeling_cropr_vit.py (mutmut skips decorated
# functions, so the forwards themselves are not mutated). `$(BIN)/mutmut results` lists the survivors,
# `$(BIN)/mutmut show NAME` a diff.
MUTANTS := 'cropr.models.cropr_vit.routing_cropr_vit.*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x_classification_loss__*' 'cropr.models.cropr_vit.modeling_cropr_vit.x_masked_cross_entropy__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x_sum_aux_losses__*' 'cropr.models.cropr_vit.modeling_cropr_vit.x_total_loss__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x*CroprViTPreTrainedModel*strip_training_modules__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x*CroprViTModel*_start_routing__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x*CroprViTModel*_prune__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x*CroprViTForImageClassification*_losses__*' \
	'cropr.models.cropr_vit.modeling_cropr_vit.x*CroprViTForSemanticSegmentation*_losses__*'

mutation: setup
	$(BIN)/pip install --quiet -e ".[mutation]"
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 $(BIN)/mutmut run $(MUTANTS)
