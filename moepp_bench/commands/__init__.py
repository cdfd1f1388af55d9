"""One module per command; each defines register(app). The app discovers them, so adding a command
means adding a module here and nothing else."""
