"""Fine-tuning the assembled student, data-parallel on the ranks that train."""
