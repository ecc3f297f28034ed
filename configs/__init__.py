"""Experiment configs: ``base.py`` (every field commented) and one file per experiment."""
