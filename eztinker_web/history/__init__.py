"""A run's history: its metrics over steps and its recent operations."""
