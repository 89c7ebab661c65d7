"""The chat stages' committed tokenizer, for the sft_data half of the augment tests."""
from tests.tasks.chat.conftest import tokenizer_ref  # noqa: F401  (a fixture)
