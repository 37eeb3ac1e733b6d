"""Optional experiment trackers beside TensorBoard (`train.loggers`): Weights & Biases and MLflow, each an extra
(`pip install -e ".[wandb]"`, `".[mlflow]"`). Each gets what TensorBoard gets, from RunLogger on rank 0 only: the
resolved config once, every train/eval scalar at its step under TensorBoard's names (train/loss, eval/miou, ...),
and at the end the final metrics (final/...) and the run summary (summary/...).

A resumed run continues the same tracker run: its id is kept in OUTPUT_DIR/trackers.json (W&B: `id` with
`resume="allow"`, as W&B documents for preempted jobs; MLflow: the run_id and the tracking URI it lives at).
Where things go is the libraries' own settings, read from the environment: WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE
(offline: no network), MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (docs/engine.md, "Experiment trackers").
This module imports neither library until a run starts one.
"""

import importlib.util
import logging
import os
import time
from pathlib import Path

from rs_transfer.config import ConfigError, flatten
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_json, read_json

log = logging.getLogger(__name__)

# name in train.loggers -> (the module it imports, the pyproject extra that installs it)
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
STATE_FILE = "trackers.json"
PROJECT = "rs-transfer"  # W&B project and MLflow experiment when WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME are unset
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limit on params


def check_installed(loggers: list[str]) -> None:
    """ConfigError naming the extra to install when a tracker in `loggers` has no package; imports nothing (a
    find_spec costs microseconds, importing wandb or mlflow about a second)."""
    for name in loggers:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise ConfigError(_missing(name))


def _missing(name: str) -> str:
    module, extra = PACKAGES[name]
    return (f"train.loggers names {name}, but the {module} package is not installed: pip install -e \".[{extra}]\" "
            f"(or drop {name} from train.loggers)")


def start_trackers(out: Path, loggers: list[str], config: dict, resumed: bool) -> list:
    """The trackers of `loggers` (TensorBoard aside), each with its run started or, when `resumed`, continued
    from OUTPUT_DIR/trackers.json. A tracker that cannot start (not logged in, no server) is a UserError: the run
    has not begun, and the user asked for it."""
    path = out / STATE_FILE
    state = read_json(path, "the trackers' run ids") if resumed and path.exists() else {}
    trackers = []
    for name in dict.fromkeys(loggers):  # a name given twice is one tracker
        if name not in PACKAGES:
            continue
        starter = {"wandb": WandbTracker, "mlflow": MlflowTracker}[name]
        try:
            tracker = starter(out, state.get(name), config)
        except ImportError:
            raise ConfigError(_missing(name)) from None
        except Exception as error:  # each library raises its own types (wandb.Error, MlflowException, OSError)
            raise UserError(f"train.loggers: {name} could not start its run: {_fix_first(name, error)}"
                            f"{_one_line(error)}") from None
        state[name] = tracker.state
        trackers.append(tracker)
    if trackers:
        atomic_write_json(path, state)
    return trackers


def _fix_first(name: str, error: BaseException) -> str:
    """What to do, said before the library's reason, for the failure a fresh install meets: MLflow 3's default store
    sqlite:///mlflow.db needs the full mlflow package (SQLAlchemy), which the mlflow extra (mlflow-skinny) lacks, and
    MLflow's 400-character answer names neither."""
    sqlite_refused = "unsupported URI 'sqlite" in str(error)
    if name == "mlflow" and sqlite_refused and importlib.util.find_spec("sqlalchemy") is None:
        return ("an sqlite store (MLflow 3's default, sqlite:///mlflow.db) needs the full mlflow package: pip install "
                "mlflow, or set MLFLOW_TRACKING_URI=file:./mlruns MLFLOW_ALLOW_FILE_STORE=true (a local folder) or a "
                "server's http://... address; MLflow said: ")
    return ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


class WandbTracker:
    """A W&B run in OUTPUT_DIR/wandb. Steps must increase in a W&B run: RunLogger never sends a step the run had
    already logged before a resume (the killed run's steps past its checkpoint stay as they were; an exact resume
    computes the same values again)."""

    name = "W&B"

    def __init__(self, out: Path, state: dict | None, config: dict):
        import wandb

        # console="off": our log lines and progress bar stay as they are (W&B's capture wraps stdout and stderr)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=out.name,
                              id=state["id"] if state else None, resume="allow", dir=str(out),
                              config=None if state else config, settings=wandb.Settings(console="off"))
        if state:  # a resume may change evaluation and location keys (config.EVAL_KEYS, LOCATION_KEYS)
            self.run.config.update(config, allow_val_change=True)
        self.state = {"id": self.run.id}

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def final(self, values: dict, step: int) -> None:
        self.run.summary.update(values)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowTracker:
    """An MLflow run through MlflowClient (no global active run, so nothing leaks into a user's own mlflow calls).
    The config goes in as params once (flattened: train.lr, ...; MLflow refuses a param changed later) and as the
    artifact config.yaml at every start (a resume may change evaluation keys)."""

    name = "MLflow"

    def __init__(self, out: Path, state: dict | None, config: dict):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = state["tracking_uri"] if state else mlflow.get_tracking_uri()
        self.client = MlflowClient(uri)
        if state:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(experiment_name))
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]  # MLflow's length limit
            for first in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=params[first:first + MLFLOW_PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.yaml")
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in values.items()])

    def final(self, values: dict, step: int) -> None:
        self.log(values, step)

    def close(self, finished: bool) -> None:
        # KILLED, not FAILED: a stopped run is continued by a resume, which sets it RUNNING again
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
