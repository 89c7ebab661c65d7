"""Prefect flows: sequencing only. pipeline.py is the table of contents; stage_task.py runs any stage through the store."""
