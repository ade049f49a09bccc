"""Every evaluation a plan asks for, run on a loaded model: each writes its files into the results folder, and the
figures come back grouped by what they were measured on (the groups are recorded on the model version) with the
report lines (`report_text`: the printed report). `crlft eval` (jobs/evaluate.py) checks every input before and
records the figures in MLflow after.

Retention (crlft/eval/retention.py says what is measured and why) runs here too: `plan_retention` decides whether
and against which base model, `base_answers` measures the base once per base model, check and decoder and reads it
from `<state_dir>/retention/<key>.json` after, and `measure_retention` writes both answer sets beside the other
results."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crlft.errors import CrlftError
from crlft.storage import folder_revision, write_jsonl

if TYPE_CHECKING:  # torch and transformers come with these: imported where the model runs, not for --help
    from crlft.config import Config, EvalConfig
    from crlft.data.records import Conversation
    from crlft.eval.answers import Decoder
    from crlft.eval.general_check import CheckItem
    from crlft.eval.judge import JudgeFn
    from crlft.eval.retention import GeneralAnswers
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
    def retention(self) -> RetentionPlan | None: ...  # the retention to measure, with the same decoder


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


# ---------------------------------------------------------------------------------------------------------------------
# Retention: the candidate's general answers against its base model's


RETENTION_FILES = {"retention.json", "retention_answers.jsonl", "retention_judgments.jsonl"}


@dataclass(frozen=True)
class RetentionPlan:
    """The retention `crlft eval` measures (crlft/eval/retention.py says what is measured and why)."""

    base_model: Path  # the reference: the model the candidate was fine-tuned from
    items: list[CheckItem]  # the general check (a sample spread over the kinds when limited)
    prompts: list[str]  # open prompts for agreement
    asked: bool  # --retention given: a base that knows nothing is an error, not a skipped figure


def plan_retention(model_dir: Path | None, base_model: str | None, wanted: bool | None, check_limit: int | None,
                   open_limit: int) -> RetentionPlan | None:
    """The retention to measure, or None. `wanted` None is auto: measured when the model's base is a pretrained model
    found here (the tiny default knows nothing to keep). Asked for (`wanted` True) without a base found: an error."""
    from crlft.eval.general_check import load_check
    from crlft.eval.retention import open_prompts
    from crlft.export import read_meta
    from crlft.model import is_pretrained

    if wanted is False:
        return None
    base = base_model or (read_meta(model_dir).extra.get("base_model") if model_dir else None)
    if base is None or not Path(str(base)).expanduser().is_dir():
        if wanted:
            where = f"{base} does not exist here" if base else "the model names no base model"
            raise CrlftError(f"retention needs the base model ({where}): give it with --base-model DIR")
        return None
    if wanted is None and not is_pretrained(str(base)):
        return None
    return RetentionPlan(Path(str(base)).expanduser(), load_check(limit=check_limit), open_prompts(open_limit),
                         bool(wanted))


def base_answers(plan: RetentionPlan, cfg: Config, engine: EngineSettings,
                 batch_size: int) -> tuple[GeneralAnswers, bool]:
    """The base model's answers and whether they came from the cache (`<state_dir>/retention/<key>.json`); measured
    with the candidate's decoder settings and cached otherwise. Run before the candidate's decoder starts: one engine
    at a time."""
    from crlft.eval import retention as rt
    from crlft.inference.decoding import dtype_name, load_model, open_decoder

    decoder_name = f"{engine.kind}:{dtype_name(engine)}"
    key = rt.base_cache_key(folder_revision(plan.base_model), plan.items, plan.prompts, decoder_name)
    cache = Path(cfg.state_dir).resolve() / "retention" / f"{key}.json"
    found = rt.read_cached(cache)
    if found is not None:
        return found, True
    base = load_model(plan.base_model, engine)
    with open_decoder(plan.base_model, engine) as decoder:
        answers = rt.answer_general(base, plan.items, plan.prompts, decoder, batch_size)
    rt.write_cached(cache, answers)
    return answers, False


def measure_retention(exported: ExportedModel, plan: RetentionPlan, base: tuple[GeneralAnswers, bool],
                      decoder: Decoder | None, out: Path, batch_size: int,
                      judge: tuple[JudgeFn, dict[str, dict[str, Any]]] | None = None,
                      ) -> tuple[dict[str, float], list[str]]:
    """The candidate's answers (by `decoder`) against the base's: the figures, written to `out`, and the report line.
    With a judge (and its prompts), the open answers are also compared by it
    (crlft.eval.retention.judged_comparison)."""
    from crlft.eval import retention as rt

    started = time.monotonic()
    items, prompts = plan.items, plan.prompts
    reference, cached = base
    if reference.scores["general_accuracy"] <= 0 and not plan.asked:
        return {}, [f"retention: not measured, {plan.base_model} answers none of the general check right"]
    candidate = rt.answer_general(exported, items, prompts, decoder, batch_size)
    figures = rt.retention_metrics(candidate, reference)
    (out / "retention.json").write_text(json.dumps({"figures": figures, "base_model": str(plan.base_model),
                                                    "base_cached": cached}, indent=2))  # fmt: skip
    write_jsonl(out / "retention_answers.jsonl", [
        {"id": item.id, "kind": item.kind, "prompt": item.prompt, "answer": answer, "base_answer": base_answer}
        for item, answer, base_answer in zip(items, candidate.check_answers, reference.check_answers, strict=True)])
    agreement = ""
    if prompts:
        agreement = f"; agreement with its answers {figures['agreement']:.3f} on {len(prompts)} open prompts"
    if prompts and judge is not None:
        judged, verdicts = rt.judged_comparison(prompts, candidate.open_answers, reference.open_answers, *judge)
        figures |= judged
        write_jsonl(out / "retention_judgments.jsonl", verdicts)
        agreement += (f", judged at least as good on {judged['judged_not_worse']:.3f} of them (wins "
                      f"{judged['judged_wins']:.3f}, losses {judged['judged_losses']:.3f})")
    line = (f"retention {figures['retention']:.3f}: general accuracy {figures['general_accuracy']:.3f} against the "
            f"base model's {figures['base_general_accuracy']:.3f} ({len(items)} prompts{agreement}; base "
            f"{'from cache' if cached else 'measured'}; {time.monotonic() - started:.0f} s)")
    return figures, [line]
