"""Thin `python -m ray_jobs.<job>` entry points for `ray job submit`: parse arguments, load config, call uue."""
