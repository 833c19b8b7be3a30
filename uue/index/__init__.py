"""Statement indexes: the batch build on Ray Data (build.py) and reading a built index."""
