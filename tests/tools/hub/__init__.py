"""Hub push / pull tests against a local Hub served over HTTP."""
