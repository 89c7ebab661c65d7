"""lmfoundry: raw web text to an aligned language model.

The repository's top-level folders are installed as this package's subpackages, floor by
floor: ``lmfoundry.infra`` (config, store, stage runner) -> ``lmfoundry.model`` (plain torch)
-> ``lmfoundry.tasks`` (the stages, by pipeline phase) -> ``lmfoundry.flows`` (Prefect) ->
``lmfoundry.cli`` (the ``lmf`` command). Nothing imports from a floor above its own.
"""
