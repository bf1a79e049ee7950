import zoo_layers  # noqa: F401 - registers the zoo's custom layer on every rank
