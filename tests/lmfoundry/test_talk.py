"""`lmf generate` and `lmf chat` on a tiny model written here: from a folder, a stage name, a
stage version; replies checked against a slow greedy loop over the chat template's ids."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmfoundry import talk
from lmfoundry.cli import main
from lmfoundry.infra.config import ModelConfig, TokenizerConfig
from lmfoundry.infra.store import Store
from lmfoundry.model.chat import content_encoder, prompt_ids
from lmfoundry.model.transformer import Transformer, resolve, save_model
from lmfoundry.tasks.tokens.train_tokenizer import bpe_trainer, empty_tokenizer, special_token_ids

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello there! How are you today? I am fine, thanks.", "The cat sat on the mat. A dog ran in the park."] * 30
NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """model.safetensors + model_config.json + tokenizer.json + special_tokens.json."""
    cfg = TokenizerConfig(vocab_size=300)
    tok = empty_tokenizer(cfg)
    tok.train_from_iterator(TEXTS, trainer=bpe_trainer(cfg))
    special = special_token_ids(tok, cfg)
    folder = tmp_path_factory.mktemp("policy")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens.json").write_text(json.dumps(special))
    torch.manual_seed(0)
    model = Transformer(resolve(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3), tok.get_vocab_size()))
    save_model(model.state_dict(), model.cfg, folder)
    return folder


def expected_reply(folder: Path, messages: list[dict]) -> str:
    """Greedy by recomputing the whole sequence each token, stopping at <|end|> or <|eos|>."""
    from lmfoundry.model.transformer import load_model

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = True
    special = json.loads((folder / "special_tokens.json").read_text())
    texts = [t.content for t in tok.get_added_tokens_decoder().values()]
    ids = prompt_ids(messages, content_encoder(lambda s: tok.encode(s, add_special_tokens=False).ids, texts), special)
    model, new = load_model(folder).eval(), []
    with torch.no_grad():
        for _ in range(NEW):
            nxt = int(model(torch.tensor([ids + new]))[0][0, -1].argmax())
            new.append(nxt)
            if nxt in (special["end"], special["eos"]):
                break
    return tok.decode(new, skip_special_tokens=True)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW)]


def test_generate_from_a_folder_streams_the_greedy_reply(folder, capsys):
    code, out, _ = run(["generate", "--model", str(folder), "--prompt", "Hello there!", *GREEDY], capsys)
    assert code == 0
    assert out == expected_reply(folder, [{"role": "user", "content": "Hello there!"}]) + "\n"


def test_generate_a_batch_as_json_with_a_system_message(folder, capsys):
    prompts = ["Hi", "How are you today? The cat sat on the mat."]
    code, out, _ = run(["generate", "--model", str(folder), "--system", "Be brief.", "--json", *GREEDY, *[arg for p in prompts for arg in ("--prompt", p)]], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    system = [{"role": "system", "content": "Be brief."}]
    assert [r["reply"] for r in rows] == [expected_reply(folder, system + [{"role": "user", "content": p}]) for p in prompts]
    assert [r["prompt"] for r in rows] == prompts and all(1 <= r["tokens"] <= NEW for r in rows)


def commit_stages(store: Store, folder: Path, pipeline: str) -> str:
    """A train_tokenizer stage and an sft stage (model/ + hf/) whose manifest lists it as input."""
    tok_out = store.open_for_write("train_tokenizer", "aaaa0000")
    for name in ("tokenizer.json", "special_tokens.json"):
        tok_out.put_file(folder / name, name)
    tok_ref = store.commit(tok_out, {"stats": {}, "inputs": []})
    sft_out = store.open_for_write("sft", "bbbb1111")
    for name in ("model.safetensors", "model_config.json"):
        sft_out.put_file(folder / name, f"model/{name}")
    ref = store.commit(sft_out, {"stats": {"seq_len": 64}, "inputs": [tok_ref.model_dump()]})
    store.set_ref(pipeline, "sft", ref.version)
    rm_out = store.open_for_write("reward_model", "cccc2222")
    for name in ("model.safetensors", "model_config.json"):
        rm_out.put_file(folder / name, f"model/{name}")
    rm_out.write_json("model/reward.json", {"mean": 0.0, "std": 1.0})
    store.commit(rm_out, {"stats": {}, "inputs": []})
    return ref.version


def test_generate_from_a_stage_name_a_version_and_a_stage_directory(folder, tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    version = commit_stages(store, folder, "talk")
    where = ["--set", f"store.url={store.url}", "--set", "store.pipeline=talk"]
    expected = expected_reply(folder, [{"role": "user", "content": "Hello there!"}]) + "\n"
    for spec in ("sft", f"sft@{version}", str(tmp_path / "store" / "stages" / "sft" / version)):
        code, out, err = run(["generate", "--model", spec, "--prompt", "Hello there!", *GREEDY, *where], capsys)
        assert (code, out) == (0, expected), err
    code, _, err = run(["generate", "--model", "dpo", "--prompt", "x", *where], capsys)
    assert code == 2 and "pipeline 'talk' has no committed 'dpo'" in err and "lmf run --until dpo" in err
    code, _, err = run(["generate", "--model", "reward_model@cccc2222", "--prompt", "x", *where], capsys)
    assert code == 2 and "is a reward model" in err
    code, _, err = run(["generate", "--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2 and "no model.safetensors and model_config.json" in err


def test_chat_keeps_the_conversation_and_forgets_on_reset(folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there!\nHow are you today?\n/reset\nHow are you today?\n/quit\nnever read\n"))
    code, out, _ = run(["chat", "--model", str(folder), *GREEDY], capsys)
    assert code == 0
    replies = [line.removeprefix("assistant> ") for line in out.splitlines() if line.startswith("assistant> ")]
    first = expected_reply(folder, [{"role": "user", "content": "Hello there!"}])
    second = expected_reply(folder, [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "How are you today?"}])
    fresh = expected_reply(folder, [{"role": "user", "content": "How are you today?"}])
    assert replies == [first, second, fresh] and "(conversation forgotten)" in out


def test_fit_context_drops_the_oldest_turns():
    history = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10}, {"role": "user", "content": "c" * 5}]
    render = lambda h: [0] * sum(len(m["content"]) for m in h)  # one id per character
    assert len(talk.fit_context(render, list(history), max_len=30, new_tokens=5)) == 25  # fits exactly
    assert len(talk.fit_context(render, history, max_len=29, new_tokens=5)) == 5 and len(history) == 1
    assert len(talk.fit_context(render, [{"role": "user", "content": "x" * 50}], max_len=30, new_tokens=5)) == 50  # the last message stays


def test_lmf_generate_runs_as_a_command(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lmfoundry.cli", "generate", "--model", str(folder), "--prompt", "Hello there!", "--raw", *GREEDY, "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["prompt"] == "Hello there!" and 1 <= row["tokens"] <= NEW
