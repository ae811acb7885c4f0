"""Command-line tools on top of the core: segment files, evaluate, benchmark, process bags."""
