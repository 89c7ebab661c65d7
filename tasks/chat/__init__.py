"""Chat data stages (issue 13): readers, row shapes, the demo corpus, sft_data and preference_data."""
