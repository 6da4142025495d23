"""Runners handed down to de-identification (pipelines.deid.folder never imports this module):
the process pool on this machine, or Dask, where the same steps run as Prefect tasks on
prefect-dask's DaskTaskRunner. Chosen by configuration only (params.yaml `deid.executor: dask`,
`deid.dask_address`): an empty address starts a LocalCluster of `deid.workers` processes for the
run; a scheduler address sends the work to that cluster, whose workers need this project
installed and read/write access to SRC and DST. The pseudonymisation key travels to the workers
with the tasks: use a TLS scheduler (tls://host:8786) for a cluster beyond this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from pipelines.deid.folder import Init, Outcome, ProcessPool, Step, apply_batch
from pipelines.errors import CbhError

T = TypeVar("T")
BATCH = 8          # files per task: Prefect's per-task overhead stays small against the work


@task(name="deid-batch", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def deid_batch(step: Step, paths: list, init: Init) -> list[Outcome]:
    """A retry is safe: outputs are atomic, named by pseudonyms, and a rerun rewrites the same bytes.
    No cache key and no persisted result: the inputs hold source paths and the key, the results
    source paths; none of them may reach Prefect's database."""
    return apply_batch(step, paths, init)


def runner(address: str, workers: int):
    """prefect-dask's task runner (the `dask` extra: imported only when Dask is chosen)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise CbhError("deid.executor is dask but prefect-dask is not installed: "
                       "pip install 'cbh[dask]'") from exc
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(workers, 1), "threads_per_worker": 1,
                                         "processes": True, "dashboard_address": None})


@dataclass(frozen=True)
class DaskRunner:
    """A runner for pipelines.deid.folder: body(pmap) inside one Prefect flow run whose tasks run
    on Dask; pmap(step, items) maps a step over batches of files, results in input order."""

    address: str = ""
    workers: int = 1
    name: str = "dask"

    def __call__(self, init: Init, body: Callable[[Callable], T]) -> T:
        workers = self.workers if self.workers > 0 else (os.cpu_count() or 1)

        @flow(name="deid-on-dask", task_runner=runner(self.address, workers))
        def deid_on_dask() -> T:
            def pmap(step: Step, items: list) -> list:
                batches = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
                futures = deid_batch.map(unmapped(step), batches, unmapped(init))
                return [o for f in futures for o in f.result()]

            return body(pmap)

        return deid_on_dask()


def runner_for(executor: str, workers: int, dask_address: str) -> Callable:
    """The runner params.yaml `deid.executor` names: a process pool here, or Dask."""
    if executor == "dask":
        return DaskRunner(dask_address, workers)
    if executor != "processes":
        raise ValueError(f"params.yaml deid.executor = {executor!r}: use processes or dask")
    return ProcessPool(workers)
