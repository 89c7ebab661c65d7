from tests.tasks.chat.conftest import tokenizer_ref  # noqa: F401  (the chat stages' tokenizer fixture)
