"""Back-translation: each sentence to a pivot language and back, through two local Hugging Face
seq2seq models (MarianMT style, one directory per direction), batched, greedy (deterministic).

    translator = BackTranslator(BackTranslationConfig(forward="models/en-de", backward="models/de-en"))
    new_texts = translator.paraphrase(["How do I reset my password?", ...])

Only the free text moves: protected spans (code, URLs, numbers, placeholders, special tokens;
tasks/augment/synonyms.py's ``free_pieces``) are kept verbatim in place, and each free piece is
split into sentences, so a long message never exceeds the models' input length in one go.
Whitespace around each sentence is kept as it was. Quality depends entirely on the models given;
the tests build tiny random models, which proves the plumbing only.
"""
from __future__ import annotations

import re
from pathlib import Path

from lmfoundry.infra.config_posttrain import BackTranslationConfig
from lmfoundry.tasks.augment.synonyms import free_pieces



def sentences(piece: str) -> list[tuple[str, str, str]]:
    """(leading space, sentence, trailing space) triples that join back to `piece`."""
    out = []
    for part in re.split(r"((?<=[.!?])\s+)", piece):
        if not part:
            continue
        if not part.strip():  # a separator: glue it to the previous sentence's tail
            if out:
                lead, body, tail = out[-1]
                out[-1] = (lead, body, tail + part)
            else:
                out.append(("", "", part))
            continue
        stripped = part.strip()
        start = part.index(stripped)
        out.append((part[:start], stripped, part[start + len(stripped) :]))
    return out


class BackTranslator:
    def __init__(self, cfg: BackTranslationConfig):
        self.cfg = cfg
        self.forward = self._load(cfg.forward, "forward")
        self.backward = self._load(cfg.backward, "backward")

    def _load(self, path: str, which: str):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"augment.backtranslation.{which} {path} is not a directory: give a local Hugging Face seq2seq model "
                "(config.json, weights and tokenizer files, e.g. a MarianMT model saved with save_pretrained)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).to(self.cfg.device).eval()
        return tokenizer, model

    def translate(self, texts: list[str], direction: str) -> list[str]:
        import torch

        tokenizer, model = self.forward if direction == "forward" else self.backward
        out: list[str] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = tokenizer(texts[start : start + self.cfg.batch_size], return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                ids = model.generate(**batch.to(self.cfg.device), do_sample=False, num_beams=1, max_new_tokens=self.cfg.max_new_tokens)
            out += [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out

    def round_trip(self, texts: list[str]) -> list[str]:
        return self.translate(self.translate(texts, "forward"), "backward") if texts else []

    def paraphrase(self, texts: list[str]) -> list[str]:
        """Every text with its free sentences back-translated (all sentences of all texts in batches)."""
        layouts = []  # per text: list of pieces, each a str (kept) or an index into `todo`
        todo: list[str] = []
        for text in texts:
            layout: list[str | int] = []
            for piece, protected in free_pieces(text):
                if protected:
                    layout.append(piece)
                    continue
                for lead, body, tail in sentences(piece):
                    layout.append(lead)
                    if body:
                        layout.append(len(todo))
                        todo.append(body)
                    layout.append(tail)
            layouts.append(layout)
        done = self.round_trip(todo)
        # an empty translation keeps the original sentence rather than deleting it
        return ["".join(done[p] or todo[p] if isinstance(p, int) else p for p in layout) for layout in layouts]
