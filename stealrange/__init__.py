"""The product's command line: ``stealrange`` (every side's commands in one typer app)."""
