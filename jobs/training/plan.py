"""The worker plan: everything the driver (jobs.train) decides before the workers start and every worker reads
(jobs.training.worker). Ray Train hands the workers a plain dict (the trainer's config, which it also records as
JSON), so the plan travels as `to_ray()` and is read back with `from_ray()`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from crlft.train.lr import LrChoice
from crlft.train.schedule import StepPlan


@dataclass(frozen=True)
class WorkerPlan:
    config: dict[str, Any]  # Config.dump(): each worker validates it again (crlft.config.Config)
    base_model: str  # an absolute path when local: workers run in other folders and on other nodes
    conditions: list[str]  # the data's classes, in the order of the class ids in its packed rows
    reward_scale: dict[str, float]  # per class: the factor from the weights in the data to the training mode's
    steps: StepPlan
    lr: LrChoice  # the peak learning rate and the rule that chose it
    tracking_uri: str
    run_id: str  # the MLflow run rank 0 logs its metrics into
    run_dir: str  # the Ray Train run folder, named when a checkpoint cannot be stored there
    has_val: bool  # whether the data has a validation split (Ray dataset "val")
    shuffle_buffer: int  # packed bins each worker holds for the per-epoch shuffle
    replay_kl: float  # weight of the replay answers' KL term (crlft.train.distill); 0: no LoRA or none to distil

    def to_ray(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_ray(cls, fields: dict[str, Any]) -> WorkerPlan:
        return cls(**{**fields, "steps": StepPlan(**fields["steps"]), "lr": LrChoice(**fields["lr"])})
