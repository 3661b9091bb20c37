"""Model families, one folder each, shaped like transformers' `models/<name>/`."""
