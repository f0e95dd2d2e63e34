"""Experiment modules: `python -m experiments.<name> --workdir DIR [--config.key=value ...]`."""
