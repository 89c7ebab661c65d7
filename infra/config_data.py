"""Config sections of the data stages: acquisition, dedup, filters, PII, tokenizer and tokens.

Part of the one config tree (infra/config.py's PipelineConfig holds one field per section);
kept in its own file so the tree stays readable. Import them from lmfoundry.infra.config.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmfoundry.infra.config_base import Section, execution
from lmfoundry.infra.credentials import StorageOptions


# --------------------------------------------------------------------------- data stages


class SourceConfig(Section):
    name: str = Field(description="label stored in every document's `source` column")
    paths: list[str] = Field(description="files, directories or globs; '{stdlib}' expands to Python's standard library")
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    id_field: str | None = None
    url_field: str | None = "url"

    @model_validator(mode="after")
    def _has_paths(self) -> "SourceConfig":
        if not self.paths:
            raise ValueError(f"source '{self.name}' has no paths")
        return self


class IngestConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    max_doc_chars: int = Field(2_000_000, ge=1, description="longer documents are skipped and counted as too_long")
    min_doc_chars: int = Field(1, ge=0, description="shorter documents are skipped and counted as too_short")
    target_shard_bytes: int = Field(32 * 2**20, ge=1024, description="input files are grouped into shards of about this size")


class ExactDedupConfig(Section):
    normalize: Literal["none", "whitespace", "lower_whitespace", "nfkc_lower_whitespace"] = "nfkc_lower_whitespace"


class CrawlConfig(Section):
    """Polite web crawler (tasks/acquire/crawl.py): seed URLs -> WARC files. No seeds: an empty crawl."""

    seeds: list[str] = Field(default_factory=list, description="start URLs; '{demo_site}' serves and crawls tasks/acquire/demo_site.py's local site")
    url_lists: list[str] = Field(default_factory=list, description="fsspec paths of text files with one start URL per line")
    snapshot: str = Field("", description="label of this crawl; a recurring refresh sets a new one (e.g. the date) to get a new version")
    refresh_from: str | None = Field(None, description="a committed crawl version, or 'latest': send conditional requests with its ETag/Last-Modified")
    allowed_domains: list[str] = Field(default_factory=list, description="hosts (and their subdomains) the crawl may enter; empty: the seeds' hosts")
    max_depth: int = Field(3, ge=0, description="links followed from a seed, at most")
    max_pages: int = Field(1000, ge=0, description="pages requested (retries and robots.txt not counted), at most")
    max_bytes: int = Field(5 * 2**20, ge=1024, description="a longer body is cut here and stored with WARC-Truncated: length")
    max_redirects: int = Field(5, ge=0)
    content_types: list[str] = Field(["text/html", "application/xhtml+xml"], description="media types stored; others are counted as content_type")
    user_agent: str = Field("lmfoundry-crawler/0.1", description="sent with every request and matched against robots.txt")
    allow_private_hosts: bool = Field(False, description="allow private, loopback, link-local and metadata addresses (tests, a local demo site)")
    delay_s: float = execution(1.0, ge=0, description="least time between two requests to one host; a robots.txt crawl-delay raises it")
    max_crawl_delay_s: float = execution(60.0, ge=0, description="a host whose robots.txt asks for a longer crawl-delay is skipped")
    concurrency: int = execution(16, ge=1, description="requests in flight, all hosts together")
    concurrency_per_host: int = execution(2, ge=1)
    timeout_s: float = execution(30.0, gt=0, description="one request, connect to last byte")
    retries: int = execution(2, ge=0, description="more tries after a timeout, connection error, 429 or 5xx, with exponential backoff")
    backoff_s: float = execution(1.0, ge=0)
    warc_file_bytes: int = execution(64 * 2**20, ge=1024, description="a WARC file is closed at about this size (and the crawl can resume after it)")

    @model_validator(mode="after")
    def _seeds_are_urls(self) -> "CrawlConfig":
        for seed in self.seeds:
            if seed != "{demo_site}" and not seed.lower().startswith(("http://", "https://")):
                raise ValueError(f"seed {seed!r} is not an http(s) URL (or '{{demo_site}}')")
        return self


class IngestWarcConfig(Section):
    """WARC / WET ingest (tasks/acquire/ingest_warc.py): the crawl's WARC files and these paths -> record shards."""

    paths: list[str] = Field(default_factory=list, description="WARC/WET files or globs on any fsspec URL (.warc, .warc.gz, .warc.wet.gz)")
    source: str = Field("warc", description="`source` label of records from `paths` (crawled records are labelled 'crawl')")
    content_types: list[str] = Field(["text/html", "application/xhtml+xml"], description="response media types kept (WET text is always kept)")
    max_payload_bytes: int = Field(10 * 2**20, ge=1024, description="a longer payload is cut here and flagged truncated")
    storage_options: StorageOptions = execution({}, description="fsspec options for `paths`, e.g. {'anon': true} for a public bucket")
    chunk_bytes: int = execution(128 * 2**20, ge=1024, description="payload bytes per output Parquet file; a big WARC file becomes several")


class ExtractConfig(Section):
    """HTML to main-content text and language ID (tasks/acquire/extract.py): record shards -> documents."""

    extractor: Literal["resiliparse", "trafilatura"] = Field("resiliparse", description="resiliparse: 10-40x faster than trafilatura, token F1 ~0.98 against its text (lmf bench extract)")
    main_content: bool = Field(True, description="drop navigation, menus, footers and other boilerplate")
    languages: list[str] = Field(default_factory=list, description="keep only these languages (ISO 639-1, e.g. en); empty: keep all")
    min_language_score: float = Field(0.0, ge=0, le=1, description="drop documents whose language score is lower (CLD2: share of the text in that language; fastText: probability)")
    lid_model_path: str | None = Field(None, description="fastText language-ID model (lid.176.bin/.ftz); default: CLD2 (pycld2), compiled into the package")
    lid_max_chars: int = Field(2000, ge=100, description="language ID reads this many characters of the text")
    min_text_chars: int = Field(20, ge=0, description="shorter extracted texts are dropped as too_short")
    max_html_bytes: int = Field(10 * 2**20, ge=1024, description="larger pages are dropped as html_too_large")
    time_limit_s: float = Field(10.0, gt=0, description="per document; an extraction running longer is killed and counted as timeout")


class NearDedupConfig(Section):
    """Issue 4: MinHash LSH near-duplicate removal (see tasks/dedup/near_dedup.py)."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="remove a document whose shingle Jaccard similarity with its cluster's keeper is at least this")
    ngram: int = Field(5, ge=1, description="shingles are word n-grams of normalised text (NFKC, lower case, whitespace collapsed)")
    num_perm: int = Field(128, ge=2, le=1024, description="MinHash permutations (datasketch affine32 scheme)")
    seed: int = Field(1, ge=0, description="datasketch MinHash seed of the permutations")
    false_positive_weight: float = Field(0.1, ge=0, le=1, description="weight of the S-curve area below the threshold when choosing bands x rows")
    false_negative_weight: float = Field(0.9, ge=0, le=1, description="weight of the area above it; verification removes false positives, so recall is favoured")
    bands: int | None = Field(None, ge=1, description="set with `rows` to fix the LSH layout instead of choosing it from the weights")
    rows: int | None = Field(None, ge=1)
    verify: bool = Field(True, description="compare with the exact shingle Jaccard similarity; false: the MinHash estimate")
    keeper: Literal["first", "longest", "quality"] = Field("first", description="which document of a cluster survives: first in input order, longest text, or highest meta[quality_field]")
    quality_field: str = Field("quality", description="meta field holding a quality score (keeper=quality); documents without it rank last")
    bucket_partition_rows: int = execution(4_000_000, ge=1, description="band rows per bucket partition: bounds the memory of the pairs step")
    cluster_partition_bytes: int = execution(256 * 2**20, ge=1, description="shingle sets and signatures per cluster partition: bounds the memory of the cluster step")
    batch_bytes: int = execution(16 * 2**20, ge=1, description="text per vectorised signature batch")

    @model_validator(mode="after")
    def _layout(self) -> "NearDedupConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("near_dedup: set both bands and rows, or neither (then they are chosen from the threshold and weights)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"near_dedup: bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if self.false_positive_weight + self.false_negative_weight <= 0:
            raise ValueError("near_dedup: false_positive_weight + false_negative_weight must be positive")
        return self


class HeuristicFilterConfig(Section):
    """Gopher / C4 / FineWeb rules (tasks/filter/rules.py). A null threshold switches that check off."""

    class GopherRepetition(Section):
        enabled: bool = True
        max_dup_para_frac: float | None = Field(0.3, ge=0, description="share of paragraphs that repeat an earlier one")
        max_dup_para_char_frac: float | None = Field(0.2, ge=0, description="share of characters in repeated paragraphs")
        max_dup_line_frac: float | None = Field(0.3, ge=0, description="share of lines that repeat an earlier one")
        max_dup_line_char_frac: float | None = Field(0.2, ge=0, description="share of characters in repeated lines")
        max_top_ngram_char_frac: dict[int, float] = Field(
            default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> most frequent n-gram's share of characters"
        )
        max_dup_ngram_char_frac: dict[int, float] = Field(
            default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
            description="n -> share of characters inside repeated n-grams",
        )

    class GopherQuality(Section):
        enabled: bool = True
        min_words: int | None = Field(50, ge=0, description="words that are not just punctuation")
        max_words: int | None = Field(100_000, ge=1)
        min_mean_word_length: float | None = Field(3, ge=0)
        max_mean_word_length: float | None = Field(10, ge=0)
        max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="'#' or ellipses per word")
        max_bullet_lines_ratio: float | None = Field(0.9, ge=0, description="share of lines starting with a bullet")
        max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, description="share of lines ending with an ellipsis")
        min_alpha_words_ratio: float | None = Field(0.8, ge=0, description="share of words with at least one letter")
        alpha_words_counting: Literal["gopher", "datatrove"] = Field("gopher", description="gopher: whitespace-separated words (the Gopher paper); datatrove: punctuation tokens count as words too")
        min_stop_words: int | None = Field(2, ge=0, description="distinct stop words the text must contain")
        stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])

    class C4(Section):
        enabled: bool = True
        require_terminal_punctuation: bool = Field(True, description="only lines ending in . ? ! \" ' count")
        min_words_per_line: int = Field(3, ge=0, description="shorter lines do not count")
        max_word_length: int | None = Field(1000, ge=1, description="lines with a longer word do not count")
        remove_citations: bool = Field(True, description="strip [1], [edit], [citation needed] before judging a line")
        skip_javascript_lines: bool = True
        skip_policy_lines: bool = Field(True, description="lines about cookies, terms of use, privacy policy do not count")
        drop_lorem_ipsum: bool = True
        drop_curly_bracket: bool = True
        min_sentences: int | None = Field(5, ge=0, description="sentences in the lines that count")

    class FineWeb(Section):
        enabled: bool = True
        min_line_punct_ratio: float | None = Field(0.12, ge=0, description="share of lines ending in terminal punctuation")
        max_short_line_ratio: float | None = Field(0.67, ge=0, description="share of lines of at most short_line_chars")
        short_line_chars: int = Field(30, ge=0)
        max_dup_line_char_ratio: float | None = Field(0.01, ge=0, description="characters in repeated lines per character")
        max_newline_word_ratio: float | None = Field(0.3, ge=0, description="newlines per word (list-like pages)")

    enabled: bool = True
    gopher_repetition: GopherRepetition = GopherRepetition()
    gopher_quality: GopherQuality = GopherQuality()
    c4: C4 = C4()
    fineweb: FineWeb = FineWeb()
    samples_per_reason: int = execution(5, ge=0, description="dropped documents kept per reason in the stats for inspection")
    sample_chars: int = execution(300, ge=0, description="text characters kept per sampled document")


class QualityClassifierConfig(Section):
    """fastText quality classifier (tasks/filter/quality.py): `train_quality_classifier` learns to tell
    reference documents (`positive`) from documents of the pipeline; `quality_filter` keeps
    the documents it scores high. Off unless enabled with a `positive` source or a `model_path`."""

    enabled: bool = False
    positive: SourceConfig | None = Field(None, description="reference documents that look like what to keep (text, JSONL or Parquet files)")
    model_path: str | None = Field(None, description="an existing fastText model file to use instead of training one")
    positive_label: str = Field("__label__hq", description="the model's label for good documents")
    threshold: float | None = Field(None, ge=0, le=1, description="keep scores >= this; null: the threshold chosen on validation (0.5 for model_path)")
    keep_top_fraction: float | None = Field(None, gt=0, le=1, description="instead of a threshold, keep this fraction of best-scored documents")
    max_examples_per_class: int = Field(20_000, ge=10, description="positive examples used at most; negatives follow negative_ratio")
    negative_ratio: float = Field(1.0, gt=0, description="negative examples sampled per positive example")
    example_chars: int = Field(2000, ge=100, description="training examples are pieces of about this many characters")
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.2, gt=0)
    dim: int = Field(32, ge=2)
    word_ngrams: int = Field(2, ge=2, description="fasttext-numpy2 0.10.4 can diverge (NaN) with 1")
    bucket: int = Field(100_000, ge=1000, description="hash buckets for word n-grams (model size ~ bucket * dim * 4 bytes)")
    min_count: int = Field(1, ge=1)
    batch_size: int = execution(1000, ge=1, description="documents scored per fastText call")

    @model_validator(mode="after")
    def _has_a_model(self) -> "QualityClassifierConfig":
        if self.enabled and self.positive is None and self.model_path is None:
            raise ValueError("quality.enabled needs quality.positive (reference documents to train on) or quality.model_path (a fastText model)")
        if self.threshold is not None and self.keep_top_fraction is not None:
            raise ValueError("set quality.threshold or quality.keep_top_fraction, not both")
        return self


class PiiConfig(Section):
    """Issue 6: PII scrubbing (detectors in tasks/pii/detectors.py, stage in tasks/pii/scrub.py).

    The pseudonym key is read from the environment variable named by `key_env`; it is never
    a config field, so it cannot reach manifests, logs or Prefect parameters.
    """

    enabled: bool = True
    entities: list[Literal["EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN", "SECRET", "PERSON", "LOCATION", "ORGANIZATION"]] = Field(
        default_factory=lambda: ["EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN", "SECRET"],
        description="entity types to scrub; PERSON/LOCATION/ORGANIZATION need ner_model",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "IT", "ES", "NL", "CA", "AU", "IN"],
        description="regions (ISO 3166 codes) tried for phone numbers written without a +country prefix",
    )
    phone_validation: Literal["possible", "valid"] = Field(
        "possible", description="possible: length fits the country's plan; valid: also an assigned number range"
    )
    ip_public_only: bool = Field(False, description="scrub only globally routable IP addresses (keep 127.0.0.1, 10.x, ...)")
    url_entities: list[Literal["EMAIL", "PHONE", "IP", "CREDIT_CARD", "IBAN", "US_SSN", "SECRET"]] = Field(
        ["EMAIL", "SECRET"],
        description="types also scrubbed in the url column (never trained on; its host is provenance, so IPs stay by default)",
    )
    replacement: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", description="placeholder: <EMAIL>; pseudonym: <EMAIL_5f1c0e9a2b>, a keyed HMAC of the value"
    )
    key_env: str = Field("LMF_PII_KEY", min_length=1, description="environment variable holding the pseudonym HMAC key")
    ner_model: str | None = Field(None, description="installed spaCy model name or path for PERSON/LOCATION/ORGANIZATION (via Presidio)")
    audit_per_shard: int = Field(20, ge=0, description="found values (masked) kept per shard in audit/ for review")

    @model_validator(mode="after")
    def _check_pii(self) -> "PiiConfig":
        import phonenumbers

        unknown = [r for r in self.phone_regions if r.upper() not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"pii.phone_regions: unknown region codes {unknown}; use ISO 3166 codes such as US, GB, DE")
        ner = [e for e in self.entities if e in ("PERSON", "LOCATION", "ORGANIZATION")]
        if ner and not self.ner_model:
            raise ValueError(f"pii.entities lists {ner}, which need pii.ner_model (an installed spaCy model, e.g. en_core_web_sm)")
        if self.ner_model and not ner:
            raise ValueError("pii.ner_model is set but pii.entities lists none of PERSON, LOCATION, ORGANIZATION")
        return self


class TokenizerConfig(Section):
    """Issue 7: byte-level BPE tokenizer, trained on a deterministic sample of the documents or read from a file."""

    path: str | None = Field(None, description="an existing tokenizer.json (path or fsspec URL) to use instead of training one")
    vocab_size: int = Field(4096, ge=260, le=2**32, description="vocabulary size including the 256 byte tokens and the special tokens")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    normalization: Literal["none", "nfc", "nfkc"] = Field(
        "nfc", description="Unicode normalisation before tokenizing; 'none' makes decode(encode(text)) == text for any text"
    )
    special_tokens: dict[str, str] = Field(
        default_factory=lambda: {
            "bos": "<|bos|>",
            "eos": "<|eos|>",
            "pad": "<|pad|>",
            "system": "<|system|>",
            "user": "<|user|>",
            "assistant": "<|assistant|>",
            "end": "<|end|>",
        },
        description="role -> token text; bos, eos and pad are required; the chat roles serve SFT",
    )
    max_token_chars: int | None = Field(32, ge=1, description="longest token the trainer may create (None: unlimited)")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="train on the documents whose id hashes below this fraction")
    sample_max_chars: int = Field(100_000_000, ge=1, description="stop sampling after this many characters (input order)")
    sample_seed: int = Field(0, description="changes which documents the hash sample picks")
    batch_docs: int = execution(1000, ge=1, description="documents handed to the trainer per batch")

    @model_validator(mode="after")
    def _check_special_tokens(self) -> "TokenizerConfig":
        missing = [role for role in ("bos", "eos", "pad") if role not in self.special_tokens]
        if missing:
            raise ValueError(f"tokenizer.special_tokens needs the roles {missing} (e.g. bos: '<|bos|>')")
        if self.path is None and len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ValueError("tokenizer.special_tokens: each role needs its own token text when training a tokenizer")
        if self.path is None and self.vocab_size < 256 + len(self.special_tokens) + 1:
            raise ValueError(f"tokenizer.vocab_size {self.vocab_size} leaves no room for merges beyond 256 bytes and {len(self.special_tokens)} special tokens")
        return self


class TokenizeConfig(Section):
    """Issue 7: documents -> packed Arrow token shards (train / val) for the loader."""

    seq_len: int = Field(256, ge=8, description="tokens a model sees per sample; shards hold seq_len + 1 (inputs and shifted targets)")
    packing: Literal["pack", "pad"] = Field(
        "pack", description="pack: documents joined with EOS and cut into samples; pad: every document starts a sample, its tail padded"
    )
    add_bos: bool = Field(False, description="start every document with BOS (EOS always ends it)")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="documents whose id hashes below this go to the validation split")
    batch_docs: int = execution(512, ge=1, description="documents per encode_batch call")
