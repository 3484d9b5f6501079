"""Prefect flows: thin recipes that order the tasks and pass refs and small dicts."""
