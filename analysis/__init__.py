"""Analysis from MLflow alone: loading, statistics, figures, per-study reports."""
