"""kdpipe command line (typer). Thin: each command builds a stage config and calls run(cfg)."""
