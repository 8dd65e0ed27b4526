"""captionbot's composition root: configuration, wiring, process lifecycle and the CLI."""
