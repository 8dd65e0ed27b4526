"""One module per model task. Importing this package imports no model library."""
