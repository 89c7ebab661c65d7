"""Phase `augment`: new variants of the data, off by default. conversations.py is stage `augment`
(SFT conversations, before sft_data); documents.py is stage `augment_docs` (a small corpus,
between exact_dedup and near_dedup). Both rewrite text with synonyms.py (WordNet) and/or
backtranslate.py (two local translation models), keeping protected spans, and link every
variant to its source."""
