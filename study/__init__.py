"""Study definitions, trial planning, the Ray Tune runner, MLflow tracking and the CLI."""
