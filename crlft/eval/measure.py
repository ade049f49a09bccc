"""Every evaluation a plan asks for, run on a loaded model: each writes its files into the results folder, and the
figures come back grouped by what they were measured on (the groups are recorded on the model version) with the
report lines (`report_text`: the printed report). `crlft eval` (jobs/evaluate.py) checks every input before and
records the figures in MLflow after."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crlft.storage import write_jsonl

if TYPE_CHECKING:  # torch and transformers come with these: imported where the model runs, not for --help
    from crlft.config import EvalConfig
    from crlft.data.records import Conversation
    from crlft.eval.answers import Decoder
    from crlft.eval.judge import JudgeFn
    from crlft.eval.scoring import EvalItem
    from crlft.export import ExportedModel
    from crlft.inference.engine import EngineSettings


class Requested(Protocol):
    """What the measuring reads of an evaluation's plan (jobs/evaluate.py's, every input checked)."""

    label: str  # the model's name in the answer and judgment files
    suite_items: list[EvalItem] | None  # the verifiable suite
    suite: str | None  # its id (content hash)
    heldout_file: Path | None  # held-out conversations for the representation check
    benches: list[str]  # open-ended benchmarks to answer
    bench_dir: Path | None  # FastChat's llm_judge data folder
    judge: JudgeFn | None
    judge_model: str | None
    judge_prompts: dict[str, dict[str, Any]] | None  # FastChat's judge prompts, read once (with a judge)
    engine: EngineSettings  # what decodes the answers

    @property
    def retention(self) -> object | None: ...  # the retention to measure (jobs/retention.py), with the same decoder


def decodes(plan: Requested) -> bool:
    """Whether anything asked for is answered by a decoder (the representation check alone is not)."""
    return plan.suite_items is not None or bool(plan.benches) or plan.retention is not None


@contextlib.contextmanager
def open_plan_decoder(model_dir: Path, plan: Requested) -> Iterator[Decoder | None]:
    """The decoder of suite, benchmark and retention answers (none needed for the representation check alone)."""
    if not decodes(plan):
        yield None
        return
    from crlft.inference.decoding import open_decoder

    with open_decoder(model_dir, plan.engine) as decoder:
        yield decoder


def measure_all(exported: ExportedModel, plan: Requested, conditions: list[str],
                heldout_conversations: list[Conversation] | None, out: Path, *, settings: EvalConfig,
                decoder: Decoder | None) -> dict[str, Any]:
    """Run every requested evaluation as `settings` (the config's `eval`) says, write its files into `out`; the
    figures, grouped by what they were measured on (the groups are recorded on the model version), and the report
    lines."""
    batch_size = settings.batch_size
    from crlft.eval import mt_bench, suites
    from crlft.eval.representation import representation_check
    from crlft.inference.decoding import dtype_name
    from crlft.lineage.evaluation import suite_id

    metrics: dict[str, float] = {}
    recorded: dict[str, dict[str, float]] = {}  # suite -> figures for the version's tags (no per-task detail)
    lines: list[str] = []
    table = ""
    if decodes(plan):
        engine = plan.engine
        lines.append(f"answers decoded by {engine.kind} ({dtype_name(engine)} on {engine.device}), as `crlft serve` "
                     "would serve them")  # fmt: skip
    if plan.heldout_file and heldout_conversations is not None:
        result = representation_check(exported, heldout_conversations, out / "embeddings.png", settings.max_per_class,
                                      batch_size)  # fmt: skip
        counts = ", ".join(f"{c}: {n}" for c, n in result.counts.items())
        shown = "undefined (one condition)" if result.silhouette is None else f"{result.silhouette:.3f}"
        lines.append(f"representation: silhouette {shown} over {counts}; {result.method} plot embeddings.png")
        (out / "representation.json").write_text(json.dumps(
            {"silhouette": result.silhouette, "method": result.method, "counts": result.counts}, indent=2))
        if result.silhouette is not None:
            metrics["silhouette"] = result.silhouette
            recorded[suite_id(plan.heldout_file)] = {"silhouette": result.silhouette}
    for bench in plan.benches:
        questions = mt_bench.load_bench(bench, plan.bench_dir or ".", limit=settings.bench_limit)
        answers = mt_bench.generate_bench_answers(exported, questions, plan.label,
                                                  max_new_tokens=settings.bench_max_new_tokens,
                                                  batch_size=max(1, batch_size // 2), decoder=decoder)  # fmt: skip
        write_jsonl(out / f"{bench}_answers.jsonl", [a.to_json() for a in answers])
        if plan.judge is None or plan.judge_prompts is None:
            lines.append(f"{bench}: {len(answers)} answers saved to {bench}_answers.jsonl (no judge given)")
            continue
        judgments = mt_bench.grade(questions, answers, plan.judge, plan.judge_prompts)
        write_jsonl(out / f"{bench}_judgments.jsonl", [j.to_json(plan.label, str(plan.judge_model)) for j in judgments])
        figures = mt_bench.bench_metrics(bench, judgments)
        metrics.update(figures)
        recorded[bench] = figures
        shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        lines.append(f"{bench}: {len(answers)} questions judged by {plan.judge_model}: {shown}")
    if plan.suite_items is not None and plan.suite is not None:
        evaluation = suites.evaluate_suite(exported, plan.suite_items, conditions, batch_size, settings.max_new_tokens,
                                          decoder)
        suite_figures = suites.suite_metrics(evaluation)
        metrics.update(suite_figures)
        # Recorded last: the version's "latest suite" (what promotion compares on) is the verifiable suite.
        recorded[plan.suite] = {k: v for k, v in suite_figures.items() if "/" not in k}
        table = suites.swap_table(evaluation)
        write_jsonl(out / "condition_swap.jsonl", suites.swap_rows(evaluation))
        (out / "condition_swap.txt").write_text(table + "\n")
    return {"metrics": metrics, "recorded": recorded, "table": table, "lines": lines}


def report_text(report: dict[str, Any], lines: list[str]) -> str:
    """The printed report: the condition swap table, the report lines, where the results are and what MLflow holds."""
    parts = [report["table"]] if report["table"] else []
    parts += lines
    parts.append(f"results: {report['out_dir']}")
    if report["run_id"]:
        where = report["model_version"]
        on = f" and recorded on {where['name']} v{where['version']}" if where else ""
        parts.append(f"MLflow: evaluation run {report['run_id']}{on}")
    return "\n".join(parts)
