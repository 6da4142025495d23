"""Registry: MLflow runs and models, lineage, the promotion gate, site commissioning, model cards."""
