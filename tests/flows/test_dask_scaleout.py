"""Data stages produce byte-identical output on every task runner: local threads, local worker
processes (the default) and a 2-worker Dask LocalCluster."""
from __future__ import annotations

import pytest

from lmfoundry.flows.pipeline import stage
from lmfoundry.infra.parallel import close_dask_clients
from lmfoundry.infra.stage import run_stage
from lmfoundry.infra.store import Store
from tests.flows.corpus import make_config, make_corpus


def run_data_stages(cfg) -> dict[str, dict]:
    store = Store.from_config(cfg.store)
    ingest = run_stage(store, stage("ingest"), cfg, [])
    dedup = run_stage(store, stage("exact_dedup"), cfg, [ingest.ref])
    near = run_stage(store, stage("near_dedup"), cfg, [dedup.ref])
    return {o.ref.stage: store.manifest(o.ref.stage, o.ref.version) for o in (ingest, dedup, near)}


@pytest.fixture
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster
    close_dask_clients()


def test_dask_cluster_and_processes_output_is_byte_identical_to_local_threads(tmp_path, cluster):
    from distributed import Client, get_task_stream

    corpus = make_corpus(tmp_path / "corpus", n_files=12, duplicates=4)
    local = run_data_stages(make_config(corpus, tmp_path / "local", task_runner="threads"))
    processes = run_data_stages(make_config(corpus, tmp_path / "processes", task_runner="processes"))
    with Client(cluster) as observer, get_task_stream(observer) as stream:
        on_dask = run_data_stages(make_config(corpus, tmp_path / "dask", task_runner="dask", dask_address=cluster.scheduler_address))
    for name in ("ingest", "exact_dedup", "near_dedup"):
        for other in (on_dask, processes):
            assert other[name]["version"] == local[name]["version"]  # task runner is an execution knob
            assert other[name]["digest"] == local[name]["digest"]
            assert {p: m["checksum"] for p, m in other[name]["files"].items()} == {p: m["checksum"] for p, m in local[name]["files"].items()}
    assert local["ingest"]["stats"]["shards"] >= 4
    assert local["exact_dedup"]["stats"]["duplicates_removed"] == 4
    # every shard of both stages ran as a task on the cluster's workers (ingest: 1 map, dedup: 2 maps)
    shards = local["ingest"]["stats"]["shards"]
    assert len(stream.data) >= 3 * shards, [t["key"] for t in stream.data]
    assert {t["worker"] for t in stream.data} <= set(cluster.scheduler_info["workers"])
