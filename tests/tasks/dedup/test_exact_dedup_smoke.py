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
