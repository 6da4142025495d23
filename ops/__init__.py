"""Operations: the team servers (PostgreSQL, Prefect and MLflow on this machine)."""
