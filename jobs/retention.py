"""Retention in `crlft eval`: the candidate's general answers against its base model's (crlft/eval/retention.py says
what is measured and why). The base is measured once per base model, check and decoder, then read from
`<state_dir>/retention/<key>.json`; both answer sets are written beside the other results."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.storage import write_jsonl

if TYPE_CHECKING:
    from crlft.eval.answers import Decoder
    from crlft.eval.general_check import CheckItem
    from crlft.eval.judge import JudgeFn
    from crlft.eval.retention import GeneralAnswers
    from crlft.export import ExportedModel
    from crlft.inference.engine import EngineSettings

RESULT_FILES = {"retention.json", "retention_answers.jsonl", "retention_judgments.jsonl"}


@dataclass(frozen=True)
class RetentionPlan:
    base_model: Path  # the reference: the model the candidate was fine-tuned from
    items: list[CheckItem]  # the general check (a sample spread over the kinds when limited)
    prompts: list[str]  # open prompts for agreement
    asked: bool  # --retention given: a base that knows nothing is an error, not a skipped figure


def recorded_base(exported: ExportedModel) -> str | None:
    """The base model a crlft export names in its crlft.json (None for a model crlft did not train)."""
    base = exported.meta.extra.get("base_model")
    return str(base) if base else None


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
    from crlft.storage import folder_revision

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
