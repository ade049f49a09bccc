"""`crlft serve`: the OpenAI-compatible endpoint on local Ray Serve (or a cluster with --address), until Ctrl-C.

    crlft serve --model models:/crlft-chat@champion --port 8000 --api-key "$KEY"
    crlft serve --adapter support-de --adapter support-fr      # two adapters' champions on their one base
    crlft serve --adapter '*'                                  # every champion that is an adapter, on their one base

API keys may also come from $CRLFT_API_KEYS (comma-separated), which keeps them out of the process list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.session import start_ray
from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.lineage.versions import champion_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR|URI",
                        help="model folder, or models:/NAME@ALIAS / models:/NAME/VERSION from the MLflow registry "
                        "(default: models:/<registry.model_name>@<registry.alias>, the champion; with --adapter: "
                        "the adapters' base; with --adapter '*' alone: the one base the champions are on)")
    parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME|URI|DIR",
                        help="also serve this adapter (train.lora.merge false) on the model, under its own name: a "
                        "registered name (its champion, followed as it moves), a models:/ URI or an adapter folder; "
                        "'*' (quoted): the champion of every registered name whose champion is an adapter on the "
                        "model's base, names joining and leaving as champions move (--watch) "
                        "(repeatable; adds to serve.adapters; vLLM only)")
    config_flag(parser, "serve.host", "--host")
    config_flag(parser, "serve.port", "--port")
    parser.add_argument("--api-key", dest="api_keys", action="append", default=[], metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (repeatable; also $CRLFT_API_KEYS)")
    config_flag(parser, "serve.model_name", "--name", dest="model_name", metavar="NAME",
                help="model name clients use (default: the model's own name)")
    parser.add_argument("--watch", dest="watch_s", type=float, metavar="SECONDS",
                        help="check the registry alias for a new champion this often "
                        "(default 30 for models:/NAME@ALIAS, 0 = never)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI for models:/ (default: registry.tracking_uri, "
                        "$MLFLOW_TRACKING_URI, the local SQLite store)")
    parser.add_argument("--store", nargs="?", const="", metavar="URI",
                        help="keep the answers of requests that ask `store: true`, and users' feedback on them "
                        "(POST /v1/feedback), in a completion store at URI, a folder or s3:// / gs:// URI (default "
                        "<state_dir>/completions; serve.store.uri): the data `crlft data build` trains on next")
    parser.add_argument("--address", help="Ray cluster to deploy on (default: $RAY_ADDRESS, else a local Ray)")
    config_flag(parser, "inference.engine", "--engine")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from crlft.inference.engine import choose_engine
    from services.chat import api_keys_from_env
    from services.local import check_port_free_for_local_ray, deploy, shutdown, wait_for_interrupt
    from services.served_model import adapter_sources, engine_model, resolve_model_uri

    cfg = config_from_args(args)
    if args.store is not None:
        cfg.serve.store.uri = args.store or str(Path(cfg.state_dir) / "completions")
    cfg.serve.adapters = [*cfg.serve.adapters, *args.adapters]
    model = engine_model(args.model or (None if cfg.serve.adapters else champion_uri(cfg)), cfg, args.mlflow_uri)
    keys = [*args.api_keys, *api_keys_from_env()]
    for uri in (model, *adapter_sources(cfg.serve.adapters, cfg).values()):  # a wrong one fails now, not in Ray
        if uri is not None:
            resolve_model_uri(uri, cfg, args.mlflow_uri)
    choose_engine(cfg.inference.engine, "cpu")  # vLLM asked for and missing: one line now, not after Ray has started
    check_port_free_for_local_ray(cfg, args.address)  # taken: one line now, not HAProxy's after Ray has started
    served = " and ".join(filter(None, [model, ", ".join(cfg.serve.adapters)]))
    print(f"starting Ray Serve for {served} (inference.engine={cfg.inference.engine}) ...", file=sys.stderr, flush=True)
    started_ray, _ = start_ray(cfg, args.address)
    try:
        url = deploy(model, cfg, api_keys=keys, watch_s=args.watch_s, tracking_uri=args.mlflow_uri)
        auth = f" (API keys: {len(set(keys) | set(cfg.serve.api_keys))})" if keys or cfg.serve.api_keys else ""
        print(f"serving {served} at {url}/v1{auth}", flush=True)
        print(f"  OpenAI base_url={url}/v1   health {url}/healthz   metrics {url}/metrics   Ctrl-C to stop",
              flush=True)
        if cfg.serve.store.uri:
            print(f"  storing completions asked with store=true, and feedback, in {cfg.serve.store.uri}", flush=True)
        wait_for_interrupt()
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        shutdown(started_ray)
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("services.serve_cli"))
