"""Acquire text: the polite crawler (crawl, crawler, robots, urls, warc_parts), WARC/WET ingest, HTML extraction with language ID, file ingest, and the local demo site."""
