"""The MPI shell: messages, collective phases, data parallelism, signals, supervision."""
