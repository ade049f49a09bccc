"""The completion store as the next C-RLFT dataset: the core (crlft.data.store, no Ray), `crlft feedback stats`, and
`crlft data build STORE` on a real local Ray with a tiny tokenizer (stores are written with the store's own writers:
no server needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crlft.config import Config, load_config
from crlft.data.feedback import FeedbackRules, check_trainable, store_records
from crlft.data.store import (
    MARKER,
    id_belongs,
    is_store,
    key_id,
    open_store,
    read_store,
    response_id,
    snapshot,
    write_completions,
    write_feedback,
)
from crlft.errors import CrlftError

NOW = 1_750_000_000.0
RULES = FeedbackRules.from_config(Config())  # rated up, corrected: GPT4; unrated: GPT3; rated down: not trained


def completion(secret: bytes, n: int, question: str, answer: str, *, version: str = "1",
               messages: list[dict[str, str]] | None = None, system: str = "") -> dict[str, Any]:
    return {
        "id": response_id(secret, ""), "choice": 0, "created": NOW + n, "model": "crlft", "model_version": version,
        "revision": "rev", "condition": "GPT4", "system": system,
        "messages": json.dumps(messages or [{"role": "user", "content": question}]), "answer": answer,
        "finish_reason": "stop", "prompt_tokens": 4, "completion_tokens": 2, "metadata": "{}", "key_id": "",
    }  # fmt: skip


def feedback(row: dict[str, Any], rating: int, *, correction: str | None = None, at: float = 100.0) -> dict[str, Any]:
    return {"id": row["id"], "choice": row["choice"], "created": NOW + at, "rating": rating, "correction": correction,
            "comment": None, "key_id": ""}


def records(root: str, cfg: Config | None = None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store_records(read_store(root), FeedbackRules.from_config(cfg or Config())
                                                       ).lines]


# ---------------------------------------------------------------- the core, no Ray


def test_a_response_id_is_accepted_for_its_own_key_only() -> None:
    secret, other_secret = b"s" * 32, b"t" * 32
    mine, theirs = key_id("sk-mine"), key_id("sk-theirs")
    signed = response_id(secret, mine)
    assert signed.startswith("chatcmpl-") and id_belongs(secret, signed, mine)
    assert not id_belongs(secret, signed, theirs)
    assert not id_belongs(other_secret, signed, mine)  # another store's secret
    forged = signed[:-16] + "0" * 16
    assert not id_belongs(secret, forged, mine)
    for malformed in ("", "chatcmpl-", signed[:-1], signed + "0", signed.replace("chatcmpl-", "resp-"), "x" * 49):
        assert not id_belongs(secret, malformed, mine), malformed
    assert key_id(None) == key_id("") == "" and key_id("sk-mine") != "sk-mine"


def test_open_store_is_idempotent_and_a_foreign_marker_is_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    assert not is_store(root)
    secret = open_store(root)
    marker = (tmp_path / "store" / MARKER).read_text()
    assert open_store(root) == secret and (tmp_path / "store" / MARKER).read_text() == marker
    assert is_store(root) and is_store(root + "/")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MARKER).write_text('{"format": "someone-elses", "version": 1}\n')
    for call in (open_store, read_store):
        with pytest.raises(CrlftError, match="not a crlft completion store marker"):
            call(str(tmp_path / "other"))
    (tmp_path / "other" / MARKER).write_text('{"format": "crlft-completions", "version": 99}\n')
    with pytest.raises(CrlftError, match="version 99"):
        read_store(str(tmp_path / "other"))


def test_written_rows_read_back_in_order_with_their_latest_feedback(tmp_path: Path) -> None:
    root = str(tmp_path)
    secret = open_store(root)
    late, early = completion(secret, 5, "Late?", "B."), completion(secret, 1, "Early?", "A.", version="2")
    write_completions(root, [late, early])
    write_feedback(root, [feedback(late, 1, at=20)])
    write_feedback(root, [feedback(late, -1, at=10), feedback(early, 0, correction="   ", at=10)])  # an older part
    contents = read_store(root)
    assert [c.completion for c in contents.choices] == [early, late]
    assert contents.choices[1].rating == 1  # the latest (created last), not the part written last
    assert contents.choices[0].correction is None and RULES.kind_of(contents.choices[0]) == "unrated"
    assert contents.orphan_feedback == 0


def test_each_kind_of_feedback_trains_as_its_class(tmp_path: Path) -> None:
    root = str(tmp_path)
    secret = open_store(root)
    rows = [completion(secret, i, f"Question {i}?", f"Answer {i}.", system="Be brief." if i == 0 else "")
            for i in range(4)]  # fmt: skip
    write_completions(root, rows)
    write_feedback(root, [feedback(rows[0], 1), feedback(rows[1], -1), feedback(rows[2], -1, correction="Fixed 2."),
                          {**feedback(rows[0], 1), "id": "chatcmpl-unknown"}])  # fmt: skip
    out = store_records(read_store(root), RULES)
    assert out.counts == {"rated_up": 1, "rated_down": 1, "corrected": 1, "unrated": 1, "excluded": 1,
                          "orphan_feedback": 1}  # fmt: skip
    by_kind = {r["feedback"]: r for r in map(json.loads, out.lines)}
    assert set(by_kind) == {"rated_up", "corrected", "unrated"}  # rated down: excluded by default
    assert (by_kind["rated_up"]["condition"], by_kind["corrected"]["condition"]) == ("GPT4", "GPT4")
    assert by_kind["unrated"]["condition"] == "GPT3"
    assert by_kind["rated_up"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert by_kind["corrected"]["messages"][-1] == {"role": "assistant", "content": "Fixed 2."}  # replaces the answer
    assert by_kind["rated_up"]["store_id"] == rows[0]["id"] and by_kind["rated_up"]["store_choice"] == 0
    trained = records(root, load_config(None, {"data.feedback.rated_down": "GPT3", "data.feedback.unrated": "GPT4"}))
    assert {r["feedback"]: r["condition"] for r in trained} == {"rated_up": "GPT4", "rated_down": "GPT3",
                                                                "corrected": "GPT4", "unrated": "GPT4"}


def test_of_duplicate_conversations_the_highest_reward_is_kept(tmp_path: Path) -> None:
    root = str(tmp_path)
    secret = open_store(root)
    rows = [completion(secret, 0, "Same?", "Same."), completion(secret, 1, "Other?", "Other."),
            completion(secret, 2, "Same?", "Same."), completion(secret, 3, "Same?", "Same.")]  # fmt: skip
    write_completions(root, rows)
    write_feedback(root, [feedback(rows[2], 1)])  # the first is unrated (GPT3), the second rated up (GPT4)
    out = store_records(read_store(root), RULES)
    kept = [json.loads(line) for line in out.lines]
    assert [(r["store_id"], r["condition"]) for r in kept] == [(rows[2]["id"], "GPT4"), (rows[1]["id"], "GPT3")]
    reasons = {json.loads(text)["store_id"]: reason for text, reason in out.duplicates}
    assert set(reasons) == {rows[0]["id"], rows[3]["id"]}
    assert reasons[rows[0]["id"]].startswith("duplicate: the same conversation as line 1 of the store's records")
    assert "higher reward" in reasons[rows[0]["id"]] and rows[2]["id"] in reasons[rows[0]["id"]]
    assert "higher reward" in reasons[rows[3]["id"]]  # unrated again, against the rated-up one kept


def test_snapshot_changes_when_feedback_is_added(tmp_path: Path) -> None:
    root = str(tmp_path)
    secret = open_store(root)
    row = completion(secret, 0, "Q?", "A.")
    write_completions(root, [row])
    before = snapshot(root)
    assert snapshot(root) == before
    write_feedback(root, [feedback(row, 1)])
    assert snapshot(root) != before


def test_a_store_with_nothing_to_train_on_says_what_it_holds_and_which_setting_uses_it(tmp_path: Path) -> None:
    root = str(tmp_path)
    secret = open_store(root)
    with pytest.raises(CrlftError, match="holds no stored completions.*serve.store.uri"):
        check_trainable(root, store_records(read_store(root), RULES))
    rows = [completion(secret, i, f"Q{i}?", "A.") for i in range(2)]
    write_completions(root, rows)
    write_feedback(root, [feedback(row, -1) for row in rows])
    with pytest.raises(CrlftError, match=r"none of its 2 stored answers \(2 rated down\).*data.feedback.rated_down"):
        check_trainable(root, store_records(read_store(root), RULES))


# ---------------------------------------------------------------- crlft feedback stats


def test_feedback_stats_counts_per_model_version_and_what_would_train(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    root = str(tmp_path)
    secret = open_store(root)
    rows = [completion(secret, 0, "A?", "a", version="1"), completion(secret, 1, "B?", "b", version="1"),
            completion(secret, 2, "C?", "c", version="2"), completion(secret, 3, "A?", "a", version="2")]  # fmt: skip
    write_completions(root, rows)
    write_feedback(root, [feedback(rows[0], 1), feedback(rows[1], -1), feedback(rows[2], 0, correction="C!")])
    assert main(["feedback", "stats", root, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["snapshot"] == snapshot(root)
    assert report["models"] == [
        {"model": "crlft", "model_version": "1", "stored": 2, "rated_up": 1, "rated_down": 1, "corrected": 0,
         "unrated": 0},
        {"model": "crlft", "model_version": "2", "stored": 2, "rated_up": 0, "rated_down": 0, "corrected": 1,
         "unrated": 1},
    ]  # fmt: skip
    assert report["training"]["records_per_class"] == {"GPT4": 2}  # the unrated "A?" duplicates the rated-up one
    assert (report["training"]["excluded"], report["training"]["duplicates"]) == (1, 1)
    assert main(["feedback", "stats", root, "--set", "data.feedback.rated_down=GPT3"]) == 0
    text = capsys.readouterr().out
    table = [line.split() for line in text.splitlines()]
    assert table[1] == ["model", "version", "stored", "rated", "up", "rated", "down", "corrected", "unrated"]
    assert table[2:4] == [["crlft", "1", "2", "1", "1", "0", "0"], ["crlft", "2", "2", "0", "0", "1", "1"]]
    assert "data build would train on: GPT4 2, GPT3 1 (0 excluded, 1 duplicates)" in text
    assert main(["feedback", "stats", str(tmp_path / "nothing")]) == 2
    assert "is not a completion store" in capsys.readouterr().err


# ---------------------------------------------------------------- crlft data build STORE, on Ray


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """6 rated up, 2 corrected, 3 unrated, 2 rated down, a duplicate (unrated, of a rated-up one), an empty answer and
    a conversation the template cannot alternate (the client's messages end with an assistant turn); one feedback on
    no stored answer."""
    root = str(tmp_path_factory.mktemp("store"))
    secret = open_store(root)
    rows = [completion(secret, i, f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(13)]
    rows.append(completion(secret, 13, "What is 0 plus 0?", "It is 0."))  # the same as rows[0]
    rows.append(completion(secret, 14, "Say nothing.", " "))
    rows.append(completion(secret, 15, "", "Yes.", messages=[{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."}]))
    write_completions(root, rows)
    ratings = [feedback(rows[i], 1) for i in range(6)] + [feedback(rows[i], -1) for i in (11, 12)]
    ratings += [feedback(rows[i], -1, correction=f"{2 * i}.") for i in (6, 7)]
    write_feedback(root, [*ratings, {**feedback(rows[0], 1), "id": "chatcmpl-gone"}])
    yield root, rows


@pytest.mark.slow
def test_data_build_from_a_store(ray_session: None, store: tuple[str, list[dict[str, Any]]], tokenizer_dir: str,
                                 tmp_path: Path) -> None:
    from jobs.build_dataset import build_dataset
    from jobs.pipeline import inputs_fingerprint

    root, rows = store
    taken, pipeline_fp = snapshot(root), inputs_fingerprint([root])
    conversations = tmp_path / "files.jsonl"  # a file beside the store: both go through the same tokenizing actors
    conversations.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"File {c}?"},
                                                                {"role": "assistant", "content": "Yes."}],
                                                   "condition": c}) for c in ("GPT4", "GPT3")))  # fmt: skip
    stats = build_dataset([root, str(conversations)], tokenizer_dir, tmp_path / "out", Config())
    section = stats["store"]
    assert {k: section[k] for k in ("uri", "snapshot", "file", "excluded", "orphan_feedback", "duplicates")} == {
        "uri": root, "snapshot": taken, "file": "store.jsonl", "excluded": 2, "orphan_feedback": 1, "duplicates": 1}
    assert section["feedback"] == {"rated_up": 6, "corrected": 2, "unrated": 6, "rated_down": 2}
    assert section["records_per_class"] == {"GPT4": 8, "GPT3": 5}  # unrated: 3 and the two bad ones
    assert stats["per_class"]["GPT4"]["records"] == 9 and stats["per_class"]["GPT3"]["records"] == 4
    assert (stats["records_in"], stats["accepted"], stats["rejected"]) == (16, 13, 3)
    assert stats["fingerprints"]["store"] == taken and stats["inputs"] == sorted([root, str(conversations)])
    lines = (tmp_path / "out" / "store.jsonl").read_text().splitlines()
    assert len(lines) == 14 and json.loads(lines[-1])["store_id"] == rows[13]["id"]  # the duplicate comes last
    rejects = {r["line"]: r for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert all(r["source"] == "store.jsonl" for r in rejects.values())
    assert rejects[14]["reason"].startswith("duplicate: the same conversation as line 1 of the store's records")
    reasons = sorted(r["reason"] for line, r in rejects.items() if line != 14)
    assert reasons == ["messages[1].content: empty content",
                       "messages[2]: two assistant turns in a row (the template alternates User and Assistant)"]
    write_feedback(root, [feedback(rows[8], 1, at=200)])  # one more rated up: a new dataset
    assert snapshot(root) != taken and inputs_fingerprint([root]) != pipeline_fp
    again = build_dataset([str(conversations), root], tokenizer_dir, tmp_path / "out", Config())
    assert again["fingerprints"]["store"] == snapshot(root)
    assert again["fingerprints"]["inputs"] != stats["fingerprints"]["inputs"]
    assert again["per_class"]["GPT4"]["records"] == 10 and again["per_class"]["GPT3"]["records"] == 3


def test_data_build_refuses_an_empty_store_before_ray_starts(tmp_path: Path, tokenizer_dir: str) -> None:
    from jobs.build_dataset import build_dataset

    open_store(str(tmp_path / "store"))
    with pytest.raises(CrlftError, match="holds no stored completions"):
        build_dataset([str(tmp_path / "store")], tokenizer_dir, tmp_path / "out", Config())
    assert not (tmp_path / "out").exists()



def test_pipeline_takes_the_store_as_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`crlft pipeline --data STORE` hands the store to the data stage with the other inputs (the stage itself is
    `build_dataset`, tested above, and its fingerprint the store's snapshot)."""
    import types

    import jobs.pipeline
    from jobs.cli import main

    given: list[list[str]] = []

    def run_pipeline(cfg: Config, inputs: list[str], **kwargs: Any) -> Any:
        given.append(list(inputs))
        return types.SimpleNamespace(model_dir="m", version="1", champion=False, tracking_uri="sqlite://")

    monkeypatch.setattr(jobs.pipeline, "run_pipeline", run_pipeline)
    assert main(["pipeline", "more.jsonl", "--data", "s3://bucket/store", "--state-dir", str(tmp_path)]) == 0
    assert given == [["more.jsonl", "s3://bucket/store"]]
