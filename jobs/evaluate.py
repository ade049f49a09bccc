"""`crlft eval`: evaluate a model folder or a registered version, print the results, log them to MLflow.

    crlft eval --model DIR|models:/NAME@ALIAS|models:/NAME/VERSION --suite eval.jsonl [--condition C ...]
               [--heldout heldout.jsonl] [--bench mt_bench --bench vicuna [--judge-url URL --judge-model M]]
               [--register-as NAME | --log-to-version NAME/VERSION] [--mlflow-uri URI]
               [--engine auto|vllm|transformers] [--batch-size N]

Suite and benchmark answers are decoded by the engine `crlft serve` would serve with here (inference.engine, auto:
vLLM where installed for the device, else crlft's own; inference.precision; this machine's GPU if it has one), so the
accuracy that gates promotion is what users get.

Everything that can be wrong with the input (suite lines, held-out lines, the model URI, the tracking server, the
benchmark files, the engine) is checked before the model runs, and MLflow is written only once every figure is
measured: a bad input is one line and exit 2 with nothing half-written in the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.command_line import add_config_arguments, config_flag, config_from_args, stage_entrypoint
from crlft.config import Config
from crlft.environ import set_offline_defaults
from crlft.errors import CrlftError, first_line
from crlft.eval.measure import (
    RETENTION_FILES,
    RetentionPlan,
    base_answers,
    measure_all,
    measure_retention,
    open_plan_decoder,
    plan_retention,
    report_text,
)
from crlft.inference.decoding import dtype_name, engine_settings, load_model
from crlft.lineage.tags import RETENTION_SUITE, TAG
from crlft.lineage.versions import ModelRef, is_model_uri
from crlft.storage import jsonl_records
from crlft.tracking import new_run

if TYPE_CHECKING:  # torch and transformers come with these: imported where the model runs, not for --help
    from crlft.eval.judge import JudgeFn
    from crlft.eval.scoring import EvalItem
    from crlft.inference.engine import EngineSettings

JUDGE_KEY_VARIABLES = ("CRLFT_JUDGE_API_KEY", "OPENAI_API_KEY")
RESULT_FILES = {"metrics.json", "condition_swap.jsonl", "condition_swap.txt", "embeddings.png", "representation.json",
                *RETENTION_FILES}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|URI",
                        help="an exported model folder, models:/NAME@ALIAS or models:/NAME/VERSION")  # fmt: skip
    parser.add_argument("--suite", metavar="FILE", help="verifiable suite: JSONL of {prompt, answer[, id, task, "
                        "suboptimal_answer]} (the synthetic eval.jsonl)")  # fmt: skip
    parser.add_argument("--condition", action="append", metavar="C",
                        help="evaluate under this condition (repeatable; default: every condition of the model)")
    parser.add_argument("--heldout", metavar="FILE",
                        help="held-out conversations (OpenChat JSONL with `condition`) for the representation check")
    config_flag(parser, "eval.max_per_class", "--max-per-class")
    parser.add_argument("--bench", action="append", choices=["mt_bench", "vicuna"],
                        help="open-ended benchmark to answer (repeatable)")
    parser.add_argument("--bench-dir", metavar="DIR", help="FastChat llm_judge data folder (default: packaged copy)")
    config_flag(parser, "eval.bench_limit", "--bench-limit")
    parser.add_argument("--judge-url", metavar="URL",
                        help="OpenAI-compatible API base of the judge, e.g. http://host:8000/v1 (key from "
                        f"{' or '.join(JUDGE_KEY_VARIABLES)}): it grades the benchmarks' answers (without it they are "
                        "saved for later grading) and compares retention's open answers with the base model's")
    parser.add_argument("--judge-model", metavar="NAME", help="the judge model's name at --judge-url")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--register-as", metavar="NAME",
                        help="register the model folder as a new version of NAME and record the results on it")
    target.add_argument("--log-to-version", metavar="NAME/VERSION",
                        help="record the results on this registered version (automatic for models:/ URIs)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (only print and write files)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: config, env, local SQLite)")
    parser.add_argument("--out", metavar="DIR", help="where to write the results (default: <state_dir>/eval/...)")
    config_flag(parser, "inference.engine", "--engine", help="what decodes suite and benchmark answers, as `crlft "
                "serve` would (auto: vLLM where installed for the device, else crlft's own engine)")
    parser.add_argument("--retention", action=argparse.BooleanOptionalAction,
                        help="measure retention: the general check (crlft/assets/general) against the base model's "
                        "answers (default: when the model's base is a pretrained model found here)")
    parser.add_argument("--base-model", metavar="DIR", help="the base model retention compares with (default: the one "
                        "the model was trained from, as its crlft.json records)")  # fmt: skip
    config_flag(parser, "eval.retention_limit", "--retention-limit")
    config_flag(parser, "eval.open_limit", "--open-limit")
    config_flag(parser, "eval.batch_size", "--batch-size")
    config_flag(parser, "eval.max_new_tokens", "--max-new-tokens")
    config_flag(parser, "eval.bench_max_new_tokens", "--bench-max-new-tokens")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = evaluate_model(
        args.model, args.suite, cfg,
        conditions=args.condition, heldout=args.heldout, bench=args.bench or (), bench_dir=args.bench_dir,
        judge_url=args.judge_url, judge_model=args.judge_model,
        register_as=args.register_as, log_to_version=args.log_to_version, log_mlflow=not args.no_mlflow,
        tracking_uri=args.mlflow_uri, out_dir=args.out, retention=args.retention, base_model=args.base_model,
    )  # fmt: skip
    print(report["text"])
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The plan: every input checked before anything runs


@dataclass
class _Plan:
    model: str
    label: str
    suite_items: list[EvalItem] | None
    suite_file: Path | None
    suite: str | None  # suite id (content hash)
    heldout_file: Path | None
    benches: list[str]
    bench_dir: Path | None
    judge: JudgeFn | None
    judge_model: str | None
    judge_prompts: dict[str, dict[str, Any]] | None  # FastChat's judge prompts, read once (with a judge)
    target: ModelRef | None  # the registered version to record on (None: none, or --register-as)
    register_as: str | None
    tracking_uri: str | None  # None: MLflow not used
    log: bool  # write the results to MLflow (an evaluation run, and the version's tags when there is one)
    out_dir: Path
    engine: EngineSettings  # what decodes the answers
    retention: RetentionPlan | None = None  # set once the model is found


def _parse_version_ref(text: str) -> ModelRef:
    name, sep, version = text.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise CrlftError(f"--log-to-version {text!r}: expected NAME/VERSION, e.g. crlft-chat/3")
    return ModelRef(name, version=version)


def _load_suite(path: str | Path) -> list[EvalItem]:
    from crlft.eval.scoring import load_eval_suite

    try:
        return load_eval_suite(path)
    except CrlftError as exc:  # one line: the bad lines joined, then what to do
        raise CrlftError(str(exc).replace(":\n", ": ", 1).replace("\n", "; ") + f"; fix {path} and run again") from None


def _plan(model: str | Path, suite: str | Path | None, cfg: Config, *, heldout: str | Path | None,
          retention: bool | None, bench: Sequence[str], bench_dir: str | Path | None, judge_url: str | None,
          judge_model: str | None, register_as: str | None, log_to_version: str | None, log_mlflow: bool,
          tracking_uri: str | None, out_dir: str | Path | None) -> _Plan:
    from crlft.eval.judge import JUDGE_PROMPTS_FILE, load_judge_prompts, openai_judge
    from crlft.eval.mt_bench import BENCH_DATA, load_bench
    from crlft.lineage.evaluation import suite_id
    from crlft.lineage.versions import get_version, parse_model_uri, trained_version
    from crlft.tracking import client_for

    model = str(model)
    if suite is None and heldout is None and not bench and not retention:
        raise CrlftError("nothing to evaluate: give --suite FILE, --heldout FILE, --bench NAME and/or --retention")
    if register_as and log_to_version:
        raise CrlftError("give either --register-as or --log-to-version, not both")
    registered = is_model_uri(model)
    if registered and register_as:
        raise CrlftError(f"{model} is registered already: drop --register-as (results go on that version)")
    if bool(judge_url) != bool(judge_model):
        raise CrlftError("a judge needs both --judge-url and --judge-model")
    if judge_url and not bench and not retention:
        raise CrlftError("--judge-url grades benchmark answers and compares retention's open answers with the base "
                         "model's: add --bench mt_bench, --bench vicuna and/or --retention")
    engine = engine_settings(cfg, cfg.eval.batch_size)  # vLLM asked for but missing fails here, before anything runs
    suite_items = _load_suite(suite) if suite is not None else None
    if heldout is not None and not Path(heldout).is_file():
        raise CrlftError(f"held-out file {heldout} does not exist (write one with `crlft synth`)")
    benches = list(dict.fromkeys(bench))
    found_bench_dir = Path(bench_dir or BENCH_DATA) if benches or judge_url else None  # the judge's prompts too
    for name in benches:
        load_bench(name, found_bench_dir or ".", limit=1)
    judge = judge_prompts = None
    if judge_url:  # the prompts are read here once: the benchmarks' grading and retention's comparison use them
        judge_prompts = load_judge_prompts((found_bench_dir or Path(".")) / JUDGE_PROMPTS_FILE)
        api_key = next((os.environ[v] for v in JUDGE_KEY_VARIABLES if os.environ.get(v)), None)
        judge = openai_judge(judge_url, str(judge_model), api_key)

    target = parse_model_uri(model) if registered else _parse_version_ref(log_to_version) if log_to_version else None
    log = bool(register_as) or bool(log_to_version) or log_mlflow
    uses_mlflow = registered or log
    uri = None
    if uses_mlflow:
        client, uri = client_for(cfg, tracking_uri)  # an unreachable server fails here, before any work
        if target is None and not register_as:  # a folder `crlft train` exported: the version it registered
            target = trained_version(client, cfg.registry.model_name, model)
        if target is not None:
            version = get_version(client, target)  # a missing model, version or alias fails here too
            target = ModelRef(target.name, version=str(version.version))
    if not registered and not Path(model).is_dir():
        raise CrlftError(f"no model directory {model}: give the folder written by `crlft train`, or a registered "
                         "model as models:/NAME@ALIAS or models:/NAME/VERSION")  # fmt: skip
    label = f"{target.name}-v{target.version}" if registered and target else Path(model).resolve().name
    out = Path(out_dir) if out_dir else Path(cfg.state_dir) / "eval" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_dir(out)
    return _Plan(model, label, suite_items, Path(suite) if suite else None, suite_id(suite) if suite else None,
                 Path(heldout) if heldout else None, benches, found_bench_dir, judge, judge_model, judge_prompts,
                 target, register_as, uri, log, out, engine)  # fmt: skip


def _is_result_file(name: str) -> bool:
    return name in RESULT_FILES or name.endswith(("_answers.jsonl", "_judgments.jsonl"))


def _check_out_dir(out: Path) -> None:
    """The results replace an earlier evaluation's in `out`, never anything else."""
    if out.exists() and not out.is_dir():
        raise CrlftError(f"--out {out} is a file: give a folder for the results")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not _is_result_file(p.name))
        if others:
            raise CrlftError(f"--out {out} holds files that are not evaluation results ({', '.join(others[:3])}): "
                             "give a new or empty folder")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Evaluate


def evaluate_model(
    model: str | Path,
    suite: str | Path | None,
    cfg: Config,
    *,
    conditions: Sequence[str] | None = None,
    heldout: str | Path | None = None,
    bench: Sequence[str] = (),
    bench_dir: str | Path | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    register_as: str | None = None,
    log_to_version: str | None = None,
    log_mlflow: bool = True,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    retention: bool | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder or registered version as `cfg.eval` says; write the results under `out_dir`; log them
    to MLflow.

    Returns {"metrics": every figure, "recorded": {suite: figures recorded on the version}, "suite": suite id,
    "model_dir", "out_dir", "plot" (PNG path or None), "run_id" (MLflow evaluation run or None),
    "model_version": {"name", "version"} or None, "table": the condition swap table, "engine": what decoded the
    answers ("vllm" or "transformers"), "text": the printed report}.
    """
    from crlft.eval.representation import load_heldout
    from crlft.eval.suites import select_conditions
    from crlft.lineage.cache import resolve_model

    set_offline_defaults()
    plan = _plan(model, suite, cfg, heldout=heldout, retention=retention, bench=bench, bench_dir=bench_dir,
                 judge_url=judge_url, judge_model=judge_model, register_as=register_as, log_to_version=log_to_version,
                 log_mlflow=log_mlflow, tracking_uri=tracking_uri, out_dir=out_dir)  # fmt: skip
    model_dir = resolve_model(plan.model, cfg, tracking_uri=plan.tracking_uri)
    settings = cfg.eval
    plan.retention = plan_retention(model_dir, base_model, retention, settings.retention_limit, settings.open_limit)
    base = base_answers(plan.retention, cfg, plan.engine, settings.batch_size) if plan.retention else None
    exported = load_model(model_dir, plan.engine)
    selected = select_conditions(exported.meta, conditions)
    heldout_conversations = load_heldout(plan.heldout_file, exported.meta) if plan.heldout_file else None
    final_out = plan.out_dir
    scratch = final_out.with_name(f".{final_out.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with open_plan_decoder(model_dir, plan) as decoder:
            measured = measure_all(exported, plan, selected, heldout_conversations, scratch,
                                   settings=settings, decoder=decoder)  # fmt: skip
            if plan.retention and base:
                judge = (plan.judge, plan.judge_prompts) if plan.judge and plan.judge_prompts is not None else None
                figures, lines = measure_retention(exported, plan.retention, base, decoder, scratch,
                                                   settings.batch_size, judge)
                measured["metrics"].update(figures)
                if figures:  # the suite stays last: it is what promotion compares on
                    measured["recorded"] = {RETENTION_SUITE: figures, **measured["recorded"]}
                measured["lines"] += lines
        (scratch / "metrics.json").write_text(json.dumps(measured["metrics"], indent=2, sort_keys=True))
        if final_out.exists():
            shutil.rmtree(final_out)
        scratch.rename(final_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plot = final_out / "embeddings.png" if (final_out / "embeddings.png").is_file() else None
    report: dict[str, Any] = {
        "metrics": measured["metrics"], "recorded": measured["recorded"], "suite": plan.suite,
        "model_dir": str(model_dir), "out_dir": str(final_out), "plot": str(plot) if plot else None,
        "run_id": None, "model_version": None, "table": measured["table"], "engine": plan.engine.kind,
    }  # fmt: skip
    if plan.log:
        report.update(_log_to_mlflow(plan, cfg, model_dir, final_out, measured))
    report["text"] = report_text(report, measured["lines"])
    return report


def _log_to_mlflow(plan: _Plan, cfg: Config, model_dir: Path, out: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """One evaluation run with every figure and file; the summary figures as tags of the model version. MLflow
    retries each request with backoff; when the store still fails, one error says what was not recorded and how to
    record it (the results are in `out` either way), and the evaluation run does not end FINISHED."""
    from mlflow.exceptions import MlflowException

    from crlft.tracking import client_for, mark_failed

    done: dict[str, Any] = {}  # what is recorded so far: "target" (after --register-as), "run_id", "recorded"
    try:
        client, _ = client_for(cfg, plan.tracking_uri)
        return _record(client, plan, cfg, model_dir, out, measured, done)
    except (MlflowException, OSError, CrlftError) as exc:
        run_status = ""
        if "run_id" in done:
            failed = mark_failed(client, str(plan.tracking_uri), done["run_id"])
            run_status = f" (evaluation run {done['run_id']} left {'FAILED' if failed else 'unfinished'})"
        raise CrlftError(_not_recorded(plan, out, done, exc) + run_status) from None


def _record(client: Any, plan: _Plan, cfg: Config, model_dir: Path, out: Path, measured: dict[str, Any],
            done: dict[str, Any]) -> dict[str, Any]:
    from mlflow.entities import Metric, Param

    from crlft.lineage.evaluation import record_evaluation
    from crlft.lineage.registration import register_model

    target = plan.target
    if plan.register_as:
        version = register_model(model_dir, cfg, name=plan.register_as, tracking_uri=plan.tracking_uri)
        target = done["target"] = ModelRef(plan.register_as, version=version)
    tags = {TAG + "kind": "evaluation", TAG + "model": plan.model}
    if target is not None:
        tags |= {TAG + "model_name": target.name, TAG + "model_version": str(target.version)}
    if plan.suite:
        tags[TAG + "suite"] = plan.suite
    run_id = done["run_id"] = new_run(client, cfg.registry.experiment, f"eval {plan.label}", tags).info.run_id
    now = int(time.time() * 1000)
    params = {"model": plan.model, "suite_file": str(plan.suite_file or ""), "heldout": str(plan.heldout_file or ""),
              "benches": ",".join(plan.benches), "eval_engine": plan.engine.kind,
              "eval_dtype": dtype_name(plan.engine)}  # fmt: skip
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(measured["metrics"].items())],
                     params=[Param(k, v) for k, v in params.items()])  # fmt: skip
    client.log_artifacts(run_id, str(out), "evaluation")
    if measured["table"]:
        rows = [row for _, row in jsonl_records(out / "condition_swap.jsonl")]
        client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "condition_swap_table.json")
    if target is not None:
        for suite, figures in measured["recorded"].items():
            suite_file = plan.suite_file.name if suite == plan.suite and plan.suite_file else None
            record_evaluation(target.name, str(target.version), figures, suite, run_id=run_id,
                              suite_file=suite_file, cfg=cfg, tracking_uri=plan.tracking_uri)  # fmt: skip
    done["recorded"] = True
    client.set_terminated(run_id)
    version = {"name": target.name, "version": str(target.version)} if target is not None else None
    return {"run_id": run_id, "model_version": version}


def _not_recorded(plan: _Plan, out: Path, done: dict[str, Any], exc: BaseException) -> str:
    """What a failed write to MLflow left out, and the command that records it once the store answers."""
    target = done.get("target") or plan.target
    missing = []
    if plan.register_as and "target" not in done:
        missing.append(f"the registration of {plan.model} as {plan.register_as}")
    if not done.get("recorded"):
        missing.append("the evaluation run with its figures and files")
        if target is not None and target.version:
            missing.append(f"the figures on {target.name} v{target.version}")
    again = "run this `crlft eval` again"
    if "target" in done:  # registered already: record on that version instead of registering another
        again += f" with --log-to-version {target.name}/{target.version} in place of --register-as"
    return (f"MLflow at {plan.tracking_uri} did not record the evaluation: {first_line(exc)}. Not recorded: "
            f"{'; '.join(missing) or 'the end of the evaluation run'}. The results are in {out}; once the store "
            f"answers, {again}")


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.evaluate"))
