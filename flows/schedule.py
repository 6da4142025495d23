"""Scheduling: the retraining flow as a Prefect deployment on a work pool."""

from __future__ import annotations

import asyncio
import json
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


# What a GPU pool's jobs ask for. A process pool pins the first GPU; a Kubernetes or Docker GPU
# pool asks for the device in its own job variables (prefect.yaml shows both).
GPU_JOB_VARIABLES = {"env": {"CUDA_VISIBLE_DEVICES": "0", "CBH_TRAIN_POOL": "gpu"}}


def register(root: Path, cron: str, pool: str, train_pool: str | None = None) -> str:
    """Register (or update) the retraining deployment on `pool`; with `train_pool`, training is
    its own deployment there (jobs ask for a GPU) and the retraining runs it. Returns the name."""
    from prefect import flow as prefect_flow

    asyncio.run(_ensure_pool(pool))
    parameters: dict[str, str] = {"workspace": str(root)}
    if train_pool:
        asyncio.run(_ensure_pool(train_pool))
        train = prefect_flow.from_source(source=str(root), entrypoint="flows/retrain.py:train_flow")
        train.deploy(name=f"train-{train_pool}", work_pool_name=train_pool, parameters={"workspace": str(root)},
                     job_variables=GPU_JOB_VARIABLES, concurrency_limit=1, build=False, push=False,
                     print_next_steps=False)
        parameters["train_deployment"] = f"cbh-train/train-{train_pool}"
    remote = prefect_flow.from_source(source=str(root), entrypoint="flows/retrain.py:retrain_flow")
    # one retrain at a time: a run scheduled while the last still runs waits for it
    remote.deploy(name=f"{DEPLOYMENT}-{pool}", work_pool_name=pool, cron=cron, concurrency_limit=1,
                  parameters=parameters, build=False, push=False, print_next_steps=False)
    return f"cbh-retrain/{DEPLOYMENT}-{pool}"


async def _list() -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        lines = []
        for d in await client.read_deployments():
            crons = ", ".join(str(getattr(s.schedule, "cron", s.schedule)) for s in (d.schedules or []))
            runs = await client.get_scheduled_flow_runs_for_deployments([d.id], limit=3)
            nxt = ", ".join(str(r.next_scheduled_start_time) for r in runs) or \
                "none yet (no scheduler running: `cbh scheduler up`)"
            extra = ""
            if (d.parameters or {}).get("train_deployment"):
                extra += f"  trains with={d.parameters['train_deployment']}"
            if d.job_variables:
                extra += f"  job_variables={json.dumps(d.job_variables, sort_keys=True)}"
            lines.append(f"{d.name}  pool={d.work_pool_name}  schedule={crons or '-'}  next={nxt}{extra}")
        return lines or ["no deployments registered"]


def list_deployments() -> list[str]:
    return asyncio.run(_list())
