"""Tasks: plain functions holding the logic, and the Prefect tasks over them."""
