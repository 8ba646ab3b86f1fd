"""``--select-from PILOT``: a confirmatory study that reuses a pilot's runs as its selection seeds.

With ``--select-seeds K``, seeds FIRST..FIRST+K-1 choose each method's setting. A pilot study
made under the same settings (same task, preset, sizes, schedule, ``--resample-train``, ...)
already holds those runs: every run is a deterministic function of the settings, its method,
seed and grid point. So a fresh study with ``--select-from PILOT`` copies the pilot's records of
its selection seeds and methods (and their per-example predictions) into its own folder, marked
as selection runs, instead of training them again; the confirmatory seeds are then planned from
them as usual. Settings that differ (anything but the seeds, the methods and the selection
options) are refused, named.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spdecay.experiments.config import CompareConfig, config_differences
from spdecay.experiments.errors import RunnerError


def import_selection(config: CompareConfig, out: Path, log: Callable[[str], None]) -> list[dict]:
    """Copy the pilot's selection-seed records into ``out`` (results and predictions); returns them."""
    from spdecay.experiments.protocol import selection_seeds
    from spdecay.experiments.reporting.results_io import read_records, write_records
    from spdecay.experiments.tasks.registry import get_task
    from spdecay.experiments.training.predictions import copy_predictions

    pilot = Path(config.select_from)
    if not getattr(config, "select_seeds", 0):
        raise RunnerError("--select-from needs --select-seeds K: the pilot's first K seeds choose")
    stored = CompareConfig.load(pilot / "config.json")
    diff = [d for d in config_differences(stored, config)
            if not d.startswith(("select_seeds ", "select_from "))]
    if diff:
        raise RunnerError(f"--select-from {pilot}: the pilot was made with other settings: {'; '.join(diff)}")
    seeds = set(selection_seeds(config))
    names = {*get_task(config.task).references, *config.optimizers}
    missing = sorted(set(config.optimizers) - set(stored.optimizers))
    if missing:
        raise RunnerError(f"--select-from {pilot}: the pilot has no runs of {', '.join(missing)}")
    pilot_seeds = set(range(stored.first_seed, stored.first_seed + stored.seeds))
    if not seeds <= pilot_seeds:
        raise RunnerError(f"--select-from {pilot}: the selection seeds {sorted(seeds)} are not all among the "
                          f"pilot's seeds {sorted(pilot_seeds)}")
    records = [{**r, "role": "selection"} for r in read_records(pilot / "results.jsonl")
               if r["seed"] in seeds and r["optimizer"] in names]
    copy_predictions([pilot], records, out)
    write_records(out, records)
    log(f"--select-from {pilot}: {len(records)} runs of seeds {', '.join(map(str, sorted(seeds)))} reused as "
        "selection runs")
    return records
