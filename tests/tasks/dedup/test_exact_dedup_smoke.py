from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from tests.helpers import commit_docs, docs

SPEC = StageSpec("exact_dedup", "lmfoundry.tasks.dedup.exact_dedup:run_exact_dedup", section="exact_dedup")


def test_exact_dedup_keeps_first_occurrence(store):
    ref = commit_docs(store, [docs("Hello  World", "other", prefix="a"), docs("hello world", "third", prefix="b")])
    outcome = run_stage(store, SPEC, PipelineConfig(), [ref])
    kept = [d["id"] for d in iter_docs(store, [outcome.ref])]
    assert kept == ["a0", "a1", "b1"]
    assert outcome.stats["duplicates_removed"] == 1


def test_removed_documents_name_their_keeper_in_another_shard_on_worker_processes(store):
    import pyarrow.parquet as pq

    shards = [docs("alpha one", "beta two", prefix="a"), docs("Beta  TWO", "gamma", prefix="b"), docs("ALPHA one", "gamma", "new", prefix="c")]
    ref = commit_docs(store, shards)
    cfg = PipelineConfig(compute={"workers": 2, "task_runner": "processes", "progress": False})
    outcome = run_stage(store, SPEC, cfg, [ref])
    reader = store.reader(outcome.ref)
    removed = [row for path in reader.files("removed/", ".parquet") for row in pq.read_table(reader.local_path(path)).to_pylist()]
    assert [(r["id"], r["keeper"]) for r in removed] == [("b0", "a1"), ("c0", "a0"), ("c1", "b1")]
    assert [d["id"] for d in iter_docs(store, [outcome.ref])] == ["a0", "a1", "b1", "c2"]
    assert outcome.stats["duplicate_groups"] == 3
