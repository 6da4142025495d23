"""Scheduling: the retraining flow as a Prefect deployment on a work pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

DEPLOYMENT = "scheduled-retrain"


async def _ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def register(root: Path, cron: str, pool: str) -> str:
    """Register (or update) the deployment; returns its full name."""
    from prefect import flow as prefect_flow

    asyncio.run(_ensure_pool(pool))
    remote = prefect_flow.from_source(source=str(root), entrypoint="flows/retrain.py:retrain_flow")
    remote.deploy(name=f"{DEPLOYMENT}-{pool}", work_pool_name=pool, cron=cron,
                  parameters={"workspace": str(root)}, build=False, push=False, print_next_steps=False)
    return f"cbh-retrain/{DEPLOYMENT}-{pool}"


async def _list() -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        lines = []
        for d in await client.read_deployments():
            crons = ", ".join(str(getattr(s.schedule, "cron", s.schedule)) for s in (d.schedules or []))
            runs = await client.get_scheduled_flow_runs_for_deployments([d.id], limit=3)
            nxt = ", ".join(str(r.next_scheduled_start_time) for r in runs) or "none yet (no scheduler running)"
            lines.append(f"{d.name}  pool={d.work_pool_name}  schedule={crons or '-'}  next={nxt}")
        return lines or ["no deployments registered"]


def list_deployments() -> list[str]:
    return asyncio.run(_list())
