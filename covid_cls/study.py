"""The 2020 notebook's whole experiment: every architecture x level with shared settings.

Runs one after another in this process; the decoded images are shared between runs by DecodedCache,
so the data is read once for all six.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import TrainConfig
from .engine import fit
from .models import ARCHS, LEVELS

COLUMNS = ("arch", "level", "trainable_params", "best_val_auc", "test_accuracy", "test_sensitivity",
           "test_specificity", "test_f1", "test_auc", "seconds", "weights", "checkpoint")


def run_study(base: TrainConfig, archs: Sequence[str] = tuple(ARCHS), levels: Sequence[str] = LEVELS,
              on_event: Callable[[dict[str, Any]], None] | None = None, stop=None) -> list[dict[str, Any]]:
    """Train every (arch, level); returns one row per run (see COLUMNS) plus its ``history``.

    Events of each run are forwarded with ``run`` (1-based), ``runs`` and ``name`` added.
    """
    import torch

    emit = on_event or (lambda e: None)
    combos = [(a, lv) for a in archs for lv in levels]
    rows = []
    for i, (arch, level) in enumerate(combos, start=1):
        cfg = dataclasses.replace(base, arch=arch, level=level)
        name = f"{arch}·{level}"
        emit({"type": "run", "run": i, "runs": len(combos), "name": name})
        t0 = time.perf_counter()
        path = fit(cfg, on_event=lambda e, i=i, name=name: emit({**e, "run": i, "runs": len(combos), "name": name}),
                   stop=stop)
        card = torch.load(path, map_location="cpu", weights_only=True)
        test, val_hist = card["metrics"]["test"], card["history"]
        rows.append({
            "arch": arch, "level": level, "trainable_params": card["params"]["trainable"],
            "best_val_auc": max((h["val"].get("auc") or 0.0) for h in val_hist),
            "test_accuracy": test["accuracy"], "test_sensitivity": test["sensitivity"],
            "test_specificity": test["specificity"], "test_f1": test["f1"], "test_auc": test["auc"],
            "seconds": round(time.perf_counter() - t0, 1), "weights": card["weights_origin"],
            "checkpoint": str(path), "history": val_hist,
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "–" if v is None else str(v)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if c != "checkpoint"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n\n_Research demo — not a diagnosis._\n"


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """study.csv, study.md and study_val_auc.png / study_val_loss.png in ``out_dir``."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "study.csv", "md": out / "study.md", "auc": out / "study_val_auc.png",
             "loss": out / "study_val_loss.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(to_markdown(rows))
    runs = {f"{r['arch']}·{r['level']}": r["history"] for r in rows}
    plots.save(plots.overlaid_validation(runs, "auc"), paths["auc"])
    plots.save(plots.overlaid_validation(runs, "loss"), paths["loss"])
    return paths
