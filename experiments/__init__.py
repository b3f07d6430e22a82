"""Command-line entry points: fit, grid, evaluate, stream, bench."""
