"""Fixtures of the augment tests: the chat stages' committed tokenizer (for the sft_data half),
and two tiny random translation models with a direct round trip to compare against."""
from __future__ import annotations

import pytest
import torch

from tests.tasks.chat.conftest import tokenizer_ref  # noqa: F401  (a fixture)


def tiny_translation_model(path, vocab: list[str], seed: int) -> None:
    """A random MarianMT model and a word-level tokenizer: it 'translates' into noise, which is
    enough to check the batching, the protected spans and the reassembly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + vocab
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(seed)
    cfg = MarianConfig(
        vocab_size=len(words), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    MarianMTModel(cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def translation_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vocab = "how do i reset my password ? then stop now . run it again ! hallo wie geht es dir ja nein gut".split()
    tiny_translation_model(root / "forward", vocab, seed=1)
    tiny_translation_model(root / "backward", vocab, seed=2)
    return str(root / "forward"), str(root / "backward")


def direct_round_trip(path_forward: str, path_backward: str, sentence: str) -> str:
    """The round trip of one sentence, by hand with transformers (independent of BackTranslator)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    text = sentence
    for path in (path_forward, path_backward):
        tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)
        ids = model.generate(**tok([text], return_tensors="pt"), do_sample=False, num_beams=1, max_new_tokens=12)
        text = tok.decode(ids[0], skip_special_tokens=True).strip()
    return text or sentence
