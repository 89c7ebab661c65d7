"""Optional names, locations and organisations: Presidio with a spaCy model, only when
``pii.ner_model`` names one that is installed (or a path to one). Imported lazily: the
default configuration loads neither Presidio nor spaCy.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable

from lmfoundry.infra.config import ConfigError
from lmfoundry.tasks.pii.spans import NER_ENTITIES, PiiSpan

class NerDetector:
    """Names, locations and organisations through Presidio's spaCy recogniser (loaded lazily)."""

    CHUNK_CHARS = 100_000  # spaCy refuses texts over nlp.max_length; chunks keep memory flat

    def __init__(self, model: str, entities: list[str]):
        self.entities = [e for e in entities if e in NER_ENTITIES]
        self.analyzer = _presidio_analyzer(model)

    def find(self, text: str) -> Iterable[PiiSpan]:
        for offset, chunk in _chunks(text, self.CHUNK_CHARS):
            for r in self.analyzer.analyze(chunk, language="en", entities=self.entities):
                yield PiiSpan(offset + r.start, offset + r.end, r.entity_type, "ner")


def _chunks(text: str, size: int) -> Iterable[tuple[int, str]]:
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start + size // 2, end)
            end = cut + 1 if cut > 0 else end
        yield start, text[start:end]
        start = end


@lru_cache(maxsize=4)
def _presidio_analyzer(model: str):
    from pathlib import Path

    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer
    except ImportError as exc:
        raise ConfigError(
            f"pii.ner_model is set to '{model}' but presidio-analyzer/spaCy are not installed ({exc}); "
            "install them (`pip install presidio-analyzer spacy`) or unset pii.ner_model"
        ) from exc
    # Presidio downloads a missing model by itself; a pipeline stage must not reach the network
    if not (spacy.util.is_package(model) or Path(model).exists()):
        raise ConfigError(
            f"pii.ner_model '{model}' is not an installed spaCy model or a model directory; "
            f"install it first (`python -m spacy download {model}`) or unset pii.ner_model"
        )
    mapping = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
               "ORG": "ORGANIZATION"}
    engine = SpacyNlpEngine(
        models=[{"lang_code": "en", "model_name": model}],
        ner_model_configuration=NerModelConfiguration(model_to_presidio_entity_mapping=mapping, labels_to_ignore=[]),
    )
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(SpacyRecognizer(supported_language="en", supported_entities=list(NER_ENTITIES)))
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
