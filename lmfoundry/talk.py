"""`lmf generate` and `lmf chat`: talk to a trained model through the chat template, streaming.

    lmf generate --model sft --prompt "What is a dog?"                 # the current sft version
    lmf generate --model sft@1a2b3c4d5e6f7a8b --prompt A --prompt B --json   # a batch, JSON lines
    lmf generate --model ./store/stages/pretrain/<version> --raw --prompt "Once upon"   # continue text
    lmf chat --model sft [--system "You are terse."]                     # /reset forgets, /quit ends

--model is a stage name (the pipeline's current ref in the configured store; --config/--set
pick the store), STAGE@VERSION, a stage directory or a folder with model.safetensors +
model_config.json (tasks/train/model_source.py). Sampling: --temperature 0 is greedy;
--top-k 0 and --top-p 1 are off; --seed makes a run repeatable. A reply ends at <|end|> or
<|eos|>, or after --max-new-tokens. One prompt streams its reply as it is generated; several
prompts are generated as one left-padded batch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO


def add_commands(sub, add_config_args: Callable) -> None:
    """Register `generate` and `chat` on the `lmf` subparsers."""
    p = sub.add_parser("generate", help="generate replies from a trained model (chat template; --raw for plain text)")
    _model_args(p, add_config_args)
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeat for a batch)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template (pretrained models)")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt: prompt, reply, tokens, stopped")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("chat", help="talk to a trained model interactively (streams its replies)")
    _model_args(p, add_config_args)
    p.set_defaults(fn=cmd_chat)


def _model_args(p, add_config_args: Callable) -> None:
    add_config_args(p)
    p.add_argument("--model", required=True, help="stage name, STAGE@VERSION, stage directory or weights folder")
    p.add_argument("--system", help="a system message in front of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=0.95, help="1.0: off")
    p.add_argument("--seed", type=int, default=None, help="repeatable sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _load(args):
    """(model, codec, source) for --model; the store comes from the config unless it is a directory."""
    from lmfoundry.infra.store import Store
    from lmfoundry.tasks.train.model_source import find_model

    store = pipeline = None
    if not Path(args.model).expanduser().is_dir():
        from lmfoundry.infra.config import load_config

        cfg = load_config(args.config, args.set)
        store, pipeline = Store.from_config(cfg.store), cfg.store.pipeline
    source = find_model(args.model, store, pipeline)
    return source.load(args.device), source.codec(), source


def _sampling(args):
    from lmfoundry.model.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _messages(args, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + history


def cmd_generate(args) -> int:
    from lmfoundry.model.generate import TextStream, generate

    model, codec, _ = _load(args)
    if args.raw:
        prompts = [codec.raw_prompt(text) for text in args.prompt]
        stops = {codec.special["eos"]} if "eos" in codec.special else set()
    else:
        prompts = [codec.chat_prompt(_messages(args, [{"role": "user", "content": text}])) for text in args.prompt]
        stops = codec.stop_ids
    streaming = len(prompts) == 1 and not args.json
    on_step = TextStream(codec.decode, _writer(sys.stdout)) if streaming else None
    out = generate(
        model, prompts, max_new_tokens=args.max_new_tokens, pad_id=codec.pad_id, stop_ids=stops,
        sampling=_sampling(args), seed=args.seed, on_step=on_step,
    )
    replies = out.texts(codec.decode)
    if streaming:
        on_step.finish()
        print(flush=True)
    for i, (text, reply) in enumerate(zip(args.prompt, replies)):
        if args.json:
            row = {"prompt": text, "reply": reply, "tokens": int(out.lengths[i]), "stopped": bool(out.stopped[i])}
            print(json.dumps(row, ensure_ascii=False), flush=True)
        elif not streaming:
            print(f"[{i + 1}] {text}\n{reply}\n", flush=True)
    return 0


def cmd_chat(args, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from lmfoundry.model.generate import TextStream, generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, codec, source = _load(args)
    codec.require("bos", "end", "system", "user", "assistant")
    interactive = stdin.isatty()
    write = _writer(stdout)
    write(f"chatting with {source.origin} (/reset forgets the conversation, /quit or an empty line ends)\n")
    history: list[dict] = []
    while True:
        if interactive:
            write("you> ")
        line = stdin.readline()
        text = line.strip()
        if not line or not text or text == "/quit":
            return 0
        if text == "/reset":
            history = []
            write("(conversation forgotten)\n")
            continue
        history.append({"role": "user", "content": text})
        prompt = fit_context(lambda h: codec.chat_prompt(_messages(args, h)), history, source.max_len, args.max_new_tokens)
        write("assistant> ")
        stream = TextStream(codec.decode, write)
        generate(
            model, [prompt], max_new_tokens=args.max_new_tokens, pad_id=codec.pad_id, stop_ids=codec.stop_ids,
            sampling=_sampling(args), seed=args.seed, on_step=stream,
        )
        history.append({"role": "assistant", "content": stream.finish()})
        write("\n")


def fit_context(render: Callable[[list[dict]], list[int]], history: list[dict], max_len: int | None, new_tokens: int) -> list[int]:
    """The prompt of the conversation, dropping the oldest turns (never the last message) while
    it and the reply would not fit in the length the model was trained at; drops from ``history``."""
    prompt = render(history)
    while max_len and len(prompt) + new_tokens > max_len and len(history) > 1:
        del history[: 2 if len(history) > 2 else 1]  # a user message and its reply
        prompt = render(history)
    return prompt


def _writer(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write
