"""The teacher and its graph: blocks, student families, costs, assembly, evaluation."""
