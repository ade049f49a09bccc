"""The judge of open-ended answers: any OpenAI-compatible endpoint, asked through plain HTTP with FastChat's judge
prompts (judge_prompts.jsonl, read once by `load_judge_prompts`), its rating read as FastChat reads it."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crlft.errors import CrlftError
from crlft.storage import jsonl_records

JUDGE_PROMPTS_FILE = "judge_prompts.jsonl"
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CrlftError(f"judge prompts {path} do not exist: pass --bench-dir with FastChat's {JUDGE_PROMPTS_FILE}")
    return {str(record["name"]): record for _, record in jsonl_records(path)}


JudgeFn = Callable[[str, str], str]  # (system prompt, user prompt) -> the judge's reply


def openai_judge(url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 2) -> JudgeFn:
    """A judge behind any OpenAI-compatible endpoint (`url` is the API base, e.g. http://host:8000/v1), through plain
    HTTP: no client library needed. Temperature 0, as FastChat grades."""
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key or 'EMPTY'}"}

    def ask(system: str, user: str) -> str:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": 2048,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        last_error: Exception | None = None
        for attempt in range(retries + 1):
            request = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    return str(json.loads(response.read())["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    detail = exc.read().decode(errors="replace")[:200]
                    raise CrlftError(f"judge {endpoint} answered {exc.code}: {detail} (check --judge-model and the "
                                     "API key in CRLFT_JUDGE_API_KEY or OPENAI_API_KEY)") from None  # fmt: skip
                last_error = exc
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
                last_error = exc
            time.sleep(min(2**attempt, 10))
        raise CrlftError(f"judge {endpoint} failed after {retries + 1} tries ({last_error}): check --judge-url")

    return ask


def parse_rating(text: str) -> float:
    """The judge's [[rating]] (FastChat's format, with its fallback to [rating]); -1 when there is none."""
    for pattern in _RATING:
        match = pattern.search(text)
        if match:
            return float(match.group(1))
    return -1.0
