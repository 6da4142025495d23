"""`cbh deid` on a Dask cluster: the same steps as the process pool, as Prefect tasks run by
prefect-dask's DaskTaskRunner. Chosen by configuration only (params.yaml `deid.executor: dask`,
`deid.dask_address`): an empty address starts a LocalCluster of `deid.workers` processes for the
run; a scheduler address (tcp://host:8786) sends the work to that cluster, whose workers need
this project installed and read/write access to SRC and DST.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, task, unmapped
from prefect_dask import DaskTaskRunner

from pipelines.deid_folder import Init, Outcome, apply_batch, process

BATCH = 8          # files per task: Prefect's per-task overhead stays small against the work


@task(name="deid-batch", retries=2, retry_delay_seconds=[2, 10])
def deid_batch(step: str, paths: list[Path], init: Init) -> list[Outcome]:
    """A retry is safe: outputs are atomic, named by pseudonyms, and a rerun rewrites the same bytes."""
    return apply_batch(step, paths, init)


def runner(address: str, workers: int) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(workers, 1), "threads_per_worker": 1,
                                         "processes": True, "dashboard_address": None})


def process_on_dask(files: list[Path], init: Init, address: str, workers: int,
                    progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    @flow(name="deid-folder", task_runner=runner(address, workers))
    def deid_folder_on_dask() -> list[Outcome]:
        def pmap(step: str, items: list[Path]) -> list[Outcome]:
            batches = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
            futures = deid_batch.map(step, batches, unmapped(init))
            return [o for f in futures for o in f.result()]

        return process(files, pmap, progress)

    return deid_folder_on_dask()
