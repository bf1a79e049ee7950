"""Fine-tuning the assembled student, data-parallel on every rank."""
