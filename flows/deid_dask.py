"""`cbh deid` on a Dask cluster: the same steps as the process pool, as Prefect tasks run by
prefect-dask's DaskTaskRunner. Chosen by configuration only (params.yaml `deid.executor: dask`,
`deid.dask_address`): an empty address starts a LocalCluster of `deid.workers` processes for the
run; a scheduler address sends the work to that cluster, whose workers need this project
installed and read/write access to SRC and DST. The pseudonymisation key travels to the workers
with the tasks: use a TLS scheduler (tls://host:8786) for a cluster beyond this machine.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from pipelines.deid_folder import Init, Outcome, apply_batch

T = TypeVar("T")
BATCH = 8          # files per task: Prefect's per-task overhead stays small against the work


@task(name="deid-batch", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def deid_batch(step: str, paths: list, init: Init) -> list[Outcome]:
    """A retry is safe: outputs are atomic, named by pseudonyms, and a rerun rewrites the same bytes.
    No cache key and no persisted result: the inputs hold source paths and the key, the results
    source paths; none of them may reach Prefect's database."""
    return apply_batch(step, paths, init)


def runner(address: str, workers: int) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(workers, 1), "threads_per_worker": 1,
                                         "processes": True, "dashboard_address": None})


def on_dask(init: Init, address: str, workers: int, body: Callable[[Callable], T]) -> T:
    """body(pmap) inside one Prefect flow run whose tasks run on Dask; pmap(step, items) maps a
    step of pipelines.deid_folder over batches of files, results in input order."""
    @flow(name="deid-on-dask", task_runner=runner(address, workers))
    def deid_on_dask() -> T:
        def pmap(step: str, items: list) -> list:
            batches = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
            futures = deid_batch.map(step, batches, unmapped(init))
            return [o for f in futures for o in f.result()]

        return body(pmap)

    return deid_on_dask()
