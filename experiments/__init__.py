"""Research code that uses the package but is not part of it: the small-scale reproduction of the paper
(`python scripts/reproduce.py`)."""
