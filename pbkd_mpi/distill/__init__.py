"""Block distillation: one task on a worker, results, acceptance, the chained pass."""
