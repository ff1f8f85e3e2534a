"""Built-in study files (YAML)."""
