"""stats.json, the data stage's contract with training: what `crlft data build` wrote into DATA/ (counts, per-class
tokens, packing) and what it was built from (inputs, config, tokenizer and template, replay, store), with the
fingerprints that tie a training run to it. One class, `DataStats`, is written by the data stage and read by every
reader; the JSON on disk is the same key for key (docs/architecture.md, "Shards").

Training needs only `mode`, `conditions`, `rewards`, `pack_len` and `per_class`; every other key may be missing from
a file (a data folder written by hand, by a test or a benchmark) and is then left out when the stats are written back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crlft import storage
from crlft.config import Config, DataConfig, Mode
from crlft.errors import CrlftError

if TYPE_CHECKING:
    import pyarrow as pa

    from crlft.data.template import Template

STATS_FILE = "stats.json"
SPLITS = ("train", "val")
FILTERED_MEANS = "records of a class outside data.only_classes (e.g. --expert-only); 0 when it is unset"
INVARIANT = "records_in == accepted + rejected + filtered"
_EMPTY_CLASS = {"records": 0, "tokens": 0, "supervised_tokens": 0, "truncated": 0}
# Always written, even when None (an unset data.only_classes is written as null).
_KEPT_WHEN_NONE = frozenset({"only_classes"})


@dataclass(frozen=True)
class DataStats:
    """The contents of stats.json, in the order they are written. Nested sections stay plain JSON: `per_class`
    (class -> records, tokens, supervised_tokens, truncated), `splits` (split -> records, tokens, bins,
    packing_efficiency), `replay` (jobs.replay's section), `store` (jobs.store_input's section), `fingerprints`."""

    mode: Mode
    conditions: list[str]
    rewards: dict[str, float]
    pack_len: int
    per_class: dict[str, dict[str, Any]]
    records_in: int | None = None
    accepted: int | None = None
    rejected: int | None = None
    filtered: int | None = None
    filtered_means: str | None = None
    invariant: str | None = None
    only_classes: list[str] | None = None
    splits: dict[str, dict[str, Any]] | None = None
    bins: int | None = None
    packing_efficiency: float | None = None
    max_len: int | None = None
    overflow: str | None = None
    val_fraction: float | None = None
    seed: int | None = None
    inference_condition: str | None = None
    template: dict[str, Any] | None = None
    tokenizer: str | None = None
    inputs: list[str] | None = None
    replay: dict[str, Any] | None = None
    store: dict[str, Any] | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)

    # The order of the keys in stats.json (the writer's; fields above are ordered for the constructor's defaults).
    ORDER = ("records_in", "accepted", "rejected", "filtered", "filtered_means", "invariant", "only_classes",
             "per_class", "splits", "bins", "packing_efficiency", "pack_len", "max_len", "overflow", "val_fraction",
             "seed", "mode", "conditions", "inference_condition", "rewards", "template", "tokenizer", "inputs",
             "replay", "store", "fingerprints")  # fmt: skip

    @property
    def fingerprint(self) -> str:
        """The data's one fingerprint, over all of `fingerprints` (what a training run is tagged with)."""
        return hashlib.sha256(json.dumps(self.fingerprints, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tokens(self) -> int:
        return sum(int(c.get("tokens", 0)) for c in self.per_class.values())

    @property
    def supervised_tokens(self) -> int:
        return sum(int(c.get("supervised_tokens", 0)) for c in self.per_class.values())

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key in self.ORDER:
            value = getattr(self, key)
            if key == "mode":
                value = value.value
            if value is not None or key in _KEPT_WHEN_NONE:
                data[key] = value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataStats:
        """Raises KeyError, ValueError or TypeError where a key training needs is missing or malformed."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values.update(
            mode=Mode(data["mode"]),
            conditions=[str(c) for c in data["conditions"]],
            rewards={str(k): float(v) for k, v in data["rewards"].items()},
            pack_len=int(data["pack_len"]),
            per_class=dict(data["per_class"]),
            fingerprints=dict(data.get("fingerprints", {})),
        )
        return cls(**values)

    def write(self, out: str | Path) -> None:
        """DATA/stats.json, local or a URI; `out` is the data folder."""
        storage.write_text(f"{storage.location(out)}/{STATS_FILE}", json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, data_dir: str | Path) -> DataStats:
        """DATA/stats.json, local or a URI; errors say what to rebuild."""
        root = storage.location(data_dir)
        path = f"{root}/{STATS_FILE}"
        text = storage.read_text(path)
        if text is None:
            raise CrlftError(f"{path} does not exist: build the data first (`crlft data build --out {root}`)")
        try:
            return cls.from_json(json.loads(text))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
            raise CrlftError(f"{path}: not a crlft data description ({error!r}); rebuild the data") from None

    @classmethod
    def from_build(cls, tally: Tally, bins: dict[str, int], cfg: Config, template: Template, tokenizer: str,
                   tokenizer_fingerprint: str, paths: Sequence[str], replay: dict[str, Any] | None = None,
                   store: dict[str, Any] | None = None) -> DataStats:
        """The stats of a build: counts, per-class tokens, packing (into bins of `tally.pack_len`), and what the shards
        were built from. The counts include the replay conversations (`replay`: jobs.replay's section, None for a build
        without) and the store's records (`store`: jobs.store_input's section, None for a build without)."""
        pack_len = tally.pack_len(cfg.data)
        splits = {
            split: {
                "records": tally.split_records.get(split, 0),
                "tokens": tally.split_tokens.get(split, 0),
                "bins": bins.get(split, 0),
                "packing_efficiency": _efficiency(tally.split_tokens.get(split, 0), bins.get(split, 0), pack_len),
            }
            for split in SPLITS
        }
        total_bins = sum(bins.values())
        dumped = cfg.dump()
        data_config = {
            "classes": dumped["classes"], "default_class": cfg.default_class,
            "inference_condition": cfg.inference_condition, "template": dumped["template"],
            "data": dumped["data"], "mode": cfg.train.mode.value,
        }  # fmt: skip
        return cls(
            records_in=tally.records_in,
            accepted=tally.accepted,
            rejected=tally.rejected,
            filtered=tally.filtered,
            filtered_means=FILTERED_MEANS,
            invariant=INVARIANT,
            only_classes=cfg.data.only_classes,
            per_class={name: asdict(tally.per_class[name]) if name in tally.per_class else dict(_EMPTY_CLASS)
                       for name in cfg.classes},  # fmt: skip
            splits=splits,
            bins=total_bins,
            packing_efficiency=_efficiency(sum(tally.split_tokens.values()), total_bins, pack_len),
            pack_len=pack_len,
            max_len=cfg.data.max_len,
            overflow=cfg.data.overflow,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
            mode=cfg.train.mode,
            conditions=list(cfg.classes),
            inference_condition=cfg.inference_condition,
            rewards={name: cfg.reward(name) for name in cfg.classes},
            template=asdict(template),
            tokenizer=tokenizer,
            inputs=sorted([*paths, *([store["uri"]] if store else [])]),
            replay=replay or {"enabled": False, "conversations": 0},
            store=store,
            fingerprints={
                "inputs": tally.inputs_fingerprint(),
                "tokenizer_template": tokenizer_fingerprint,
                "config": hashlib.sha256(json.dumps(data_config, sort_keys=True).encode()).hexdigest()[:16],
                # Only where there is replay: a build without keeps the fingerprints (and training runs) it had.
                **({"replay": replay["fingerprint"]} if replay and replay["enabled"] else {}),
                **({"store": store["snapshot"]} if store else {}),
            },
        )


@dataclass
class ClassTally:
    records: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0


@dataclass
class Tally:
    """Counts that add up across batches (merge is associative), so workers can send small summaries."""

    records_in: int = 0
    accepted: int = 0
    rejected: int = 0
    filtered: int = 0
    per_class: dict[str, ClassTally] = field(default_factory=dict)
    split_records: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    longest: int = 0  # tokens of the longest accepted conversation
    digest_sum: int = 0
    digest_xor: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.records_in += 1
        self.digest_sum += record["digest"]
        self.digest_xor ^= record["digest"]
        status = record["status"]
        if status == "rejected":
            self.rejected += 1
            return
        if status == "filtered":
            self.filtered += 1
            return
        self.accepted += 1
        per_class = self.per_class.setdefault(record["condition"], ClassTally())
        per_class.records += 1
        per_class.tokens += record["n_tokens"]
        per_class.supervised_tokens += record["n_supervised"]
        per_class.truncated += int(record["truncated"])
        self.longest = max(self.longest, record["n_tokens"])
        split = record["split"]
        self.split_records[split] = self.split_records.get(split, 0) + 1
        self.split_tokens[split] = self.split_tokens.get(split, 0) + record["n_tokens"]

    def merge(self, other: Tally) -> Tally:
        merged = Tally(
            records_in=self.records_in + other.records_in,
            accepted=self.accepted + other.accepted,
            rejected=self.rejected + other.rejected,
            filtered=self.filtered + other.filtered,
            longest=max(self.longest, other.longest),
            digest_sum=self.digest_sum + other.digest_sum,
            digest_xor=self.digest_xor ^ other.digest_xor,
        )
        for name in {*self.per_class, *other.per_class}:
            a, b = self.per_class.get(name, ClassTally()), other.per_class.get(name, ClassTally())
            merged.per_class[name] = ClassTally(
                a.records + b.records, a.tokens + b.tokens, a.supervised_tokens + b.supervised_tokens,
                a.truncated + b.truncated,
            )  # fmt: skip
        for split in {*self.split_records, *other.split_records}:
            merged.split_records[split] = self.split_records.get(split, 0) + other.split_records.get(split, 0)
            merged.split_tokens[split] = self.split_tokens.get(split, 0) + other.split_tokens.get(split, 0)
        return merged

    def to_json(self) -> str:
        data = {**self.__dict__, "per_class": {k: v.__dict__ for k, v in self.per_class.items()}}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Tally:
        data = json.loads(text)
        data["per_class"] = {k: ClassTally(**v) for k, v in data["per_class"].items()}
        return cls(**data)

    def pack_len(self, data: DataConfig) -> int:
        """The length of the bins these conversations are packed into: data.pack_len, or when unset auto_pack_len's."""
        from crlft.data.pack import auto_pack_len  # pack.py imports torch, which stats.json's readers do not need

        if data.pack_len is not None:
            return data.pack_len
        return auto_pack_len(data.max_len, self.split_tokens.get("train", 0), self.longest)

    def inputs_fingerprint(self) -> str:
        """Of the multiset of record texts: independent of file names, file order and how records are split."""
        blob = json.dumps([self.records_in, self.digest_sum, self.digest_xor]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# The columns of a processed record that the tally adds up.
TALLY_COLUMNS = ["status", "condition", "split", "truncated", "n_tokens", "n_supervised", "digest"]


def summarize_block(batch: pa.Table) -> pa.Table:
    """One block's tally as one small row (a few hundred bytes): the blocks' rows add up to the stage's tally."""
    import pyarrow as pa

    tally = Tally()
    for record in batch.select(TALLY_COLUMNS).to_pylist():
        tally.add(record)
    return pa.table({"tally": [tally.to_json()]})


def nothing_usable(tally: Tally, out: str) -> str:
    """Why a build left nothing to train on."""
    if tally.accepted:
        return (f"nothing left to train on: all {tally.accepted} accepted conversations went to validation; "
                "lower --val-fraction")
    return (f"nothing usable: none of the {tally.records_in} records was accepted ({tally.rejected} rejected, "
            f"{tally.filtered} filtered by data.only_classes); reasons in {out}/rejects.jsonl")


def _efficiency(tokens: int, bins: int, pack_len: int) -> float:
    return round(tokens / (bins * pack_len), 6) if bins else 0.0
