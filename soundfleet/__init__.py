"""soundfleet command line, configuration and the one-command demo."""
