"""One module per command of `python -m pbkd_mpi`: run (coordinator and worker ranks),
plan, simulate, report. cli.py parses the arguments and calls one of them."""
