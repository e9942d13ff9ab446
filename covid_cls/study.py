"""The 2020 notebook's whole experiment: every architecture x level with shared settings.

Runs one after another in this process; the decoded images are shared between runs by DecodedCache,
so the data is read once for all six.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import events as ev
from . import report
from .checkpoints import read_card
from .config import TrainConfig
from .models import ARCHS, LEVELS

COLUMNS = ("arch", "level", "trainable_params", "best_val_auc", "test_accuracy", "test_sensitivity",
           "test_specificity", "test_f1", "test_auc", "test_auc_low", "test_auc_high", "vs_fc", "seconds", "weights",
           "checkpoint")
# added when the study is given an external set (``external=``): the same models on X-rays from elsewhere
EXTERNAL_COLUMNS = ("ext_auc", "ext_auc_low", "ext_auc_high", "ext_sensitivity", "ext_specificity", "ext_flagged",
                    "ext_wrong", "ext_wrong_flagged")


def run_study(base: TrainConfig, archs: Sequence[str] = tuple(ARCHS), levels: Sequence[str] = LEVELS,
              on_event: Callable[[ev.Event], None] | None = None, stop=None,
              external: str | Path | None = None, roots=None,
              devices: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train every (arch, level); returns one row per run (see COLUMNS) plus its ``history``.

    ``external``: a labelled folder (flat ``infected/ normal/`` or a split tree) every model is also evaluated
    on after training (EXTERNAL_COLUMNS; never trained on). When all runs are done, each level of an arch is
    compared with ``fc`` of the same arch on the test split, paired (DeLong): ``vs_fc``, the sentence, and
    ``vs_fc_result``, the numbers.

    Events of each run are forwarded with ``run`` (1-based), ``runs`` and ``name`` added.

    ``devices`` ("0,1,2,3", ["cpu", "cpu"]): the runs go in parallel, one process per device, after one decode
    here (``_on_devices``); the rows are those of the sequential study. None: one after another, here.
    """
    from .engine import fit  # here, not at import: the app builds its Study table without loading the engine

    emit = on_event or (lambda e: None)
    combos = [(a, lv) for a in archs for lv in levels]
    rows = []
    parallel = _on_devices(base, combos, devices, emit, stop, roots)   # issue 13: {run: (path, seconds)} | None
    for i, (arch, level) in enumerate(combos, start=1):
        cfg = dataclasses.replace(base, arch=arch, level=level)
        name = f"{arch}·{level}"
        if parallel is not None:
            path, seconds = parallel[i]
        else:
            emit(ev.RunStart(run=i, runs=len(combos), name=name))
            t0 = time.perf_counter()
            path = fit(cfg, on_event=lambda e, i=i, name=name: emit(e.tagged(i, len(combos), name)), stop=stop,
                       roots=roots)   # roots: see engine.fit (the app passes its data roots)
            seconds = round(time.perf_counter() - t0, 1)
        card = read_card(path)   # the card the checkpoint vouches for (size + SHA-256 checked on load)
        test, val_hist = card.split_metrics("test"), card.history
        auc_ci = (test.get("ci") or {}).get("auc") or [None, None]
        row = {
            "arch": arch, "level": level, "trainable_params": card.params.get("trainable"),
            "best_val_auc": max((h["val"].get("auc") or 0.0) for h in val_hist),
            "test_accuracy": test.get("accuracy"), "test_sensitivity": test.get("sensitivity"),
            "test_specificity": test.get("specificity"), "test_f1": test.get("f1"), "test_auc": test.get("auc"),
            "test_auc_low": auc_ci[0], "test_auc_high": auc_ci[1], "vs_fc": "",
            "seconds": seconds, "weights": card.weights_origin,
            "checkpoint": str(path), "history": val_hist,
        }
        if external:
            row.update(_external_columns(path, external, cfg, stop, roots))
            emit(ev.Log(message=f"{name} on {external}: AUC {report.with_ci(row['ext'], 'auc')}, "
                                f"{report.selective_line(row['ext'].get('selective'))}").tagged(i, len(combos), name))
        rows.append(row)
    _compare_with_fc(rows, base, emit, stop, roots)
    return rows


def _on_devices(base: TrainConfig, combos, devices, emit, stop, roots) -> dict[int, tuple[str, float]] | None:
    """Every run of the study at once, one process per device (distributed.run_on_devices); None when no
    devices were given. The data is scanned and decoded once here first, so that a bad dataset fails before
    any process starts and the workers read the decoded cache from disk instead of decoding it each."""
    from .distributed import parse_devices, run_on_devices

    devs = parse_devices(devices)
    if not devs:
        return None
    from .data import DecodedCache
    from .engine import _decode

    _decode(base, emit, roots)
    DecodedCache.clear_memory()   # the workers load their own copy; this process only waits
    emit(ev.Log(message=f"{len(combos)} runs on {len(devs)} device(s) in parallel: {', '.join(devs)}"))
    runs = [(i, len(combos), f"{a}·{lv}", dataclasses.replace(base, arch=a, level=lv))
            for i, (a, lv) in enumerate(combos, start=1)]
    return run_on_devices(runs, devs, emit, stop=stop, roots=roots)


def _stopped(stop) -> bool:
    return stop is not None and stop.is_set()


def _external_columns(path: Path, external: str | Path, cfg: TrainConfig, stop, roots=None) -> dict[str, Any]:
    """Evaluate one study model on the external folder (its test split, or the folder itself when flat)."""
    from .errors import TrainingStopped
    from .evaluation import evaluate_checkpoint

    if _stopped(stop):
        raise TrainingStopped("stopped on request")
    r = evaluate_checkpoint(path, external, split="test", device=cfg.device, roots=roots)
    sel, ci = r.get("selective") or {}, (r.get("ci") or {}).get("auc") or [None, None]
    summary = {k: r.get(k) for k in ("n", "auc", "sensitivity", "specificity", "f1", "ci", "threshold")}
    summary["subsets"] = {k: {m: v.get(m) for m in ("n", "auc", "sensitivity", "specificity", "ci")}
                          for k, v in (r.get("subsets") or {}).items()}
    summary["selective"] = {k: v for k, v in sel.items() if k != "risk_coverage"}
    return {"ext_auc": r.get("auc"), "ext_auc_low": ci[0], "ext_auc_high": ci[1],
            "ext_sensitivity": r.get("sensitivity"), "ext_specificity": r.get("specificity"),
            "ext_flagged": sel.get("flagged"), "ext_wrong": sel.get("wrong"),
            "ext_wrong_flagged": sel.get("wrong_flagged"), "ext": summary}


def _compare_with_fc(rows: list[dict[str, Any]], base: TrainConfig, emit, stop, roots=None) -> None:
    """Paired test (DeLong, same test images) of every non-fc level against fc of the same arch; fills
    ``vs_fc`` / ``vs_fc_result`` of those rows. Skipped when fc was not part of the study."""
    from .evaluation import compare_checkpoints

    fc = {r["arch"]: r for r in rows if r["level"] == "fc"}
    for r in rows:
        ref = fc.get(r["arch"])
        if ref is None or r is ref or _stopped(stop):
            continue
        res = compare_checkpoints(r["checkpoint"], ref["checkpoint"], base.data_dir, split="test", roots=roots,
                                  device=base.device)
        r["vs_fc"] = report.comparison_line(res, r["level"], "fc")
        r["vs_fc_result"] = {k: v for k, v in res.items() if k not in ("a", "b")}
        emit(ev.Log(message=f"{r['arch']} {r['vs_fc']} (test split, paired)"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "–" if v is None else str(v)


def _ci_cell(r: dict[str, Any], key: str) -> str:
    """"0.903 [0.851, 0.947]" from ``key``, ``key_low``, ``key_high`` of a row."""
    return report.with_ci({key: r.get(key), "ci": {key: [r.get(f"{key}_low"), r.get(f"{key}_high")]}}, key)


def wrong_flagged_cell(r: dict[str, Any]) -> str:
    """"18/40" wrong answers on the external set that the abstention rule flagged."""
    return "–" if r.get("ext_wrong") is None else f"{r.get('ext_wrong_flagged', 0)}/{r['ext_wrong']}"


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the study table as shown (CLI, markdown, the app): values with their 95 % CIs;
    the external columns only when a row has them."""
    external = any(r.get("ext_auc") is not None or r.get("ext_wrong") is not None for r in rows)
    headers = ["arch", "level", "trainable params", "best val AUC", "test acc", "test sens", "test spec", "test F1",
               "test AUC [95% CI]"]
    if external:
        headers += ["ext AUC [95% CI]", "ext sens", "ext spec", "ext wrong flagged"]
    headers += ["vs fc (paired, test)", "seconds", "weights"]
    cells = []
    for r in rows:
        row = [_fmt(r.get(c)) for c in ("arch", "level", "trainable_params", "best_val_auc", "test_accuracy",
                                         "test_sensitivity", "test_specificity", "test_f1")]
        row.append(_ci_cell(r, "test_auc"))
        if external:
            row += [_ci_cell(r, "ext_auc"), _fmt(r.get("ext_sensitivity")), _fmt(r.get("ext_specificity")),
                    wrong_flagged_cell(r)]
        vs = (r.get("vs_fc") or "").split(": ", 1)[-1] if r.get("vs_fc") else "–"
        secs = r.get("seconds")
        cells.append(row + [vs, f"{secs:.1f}" if isinstance(secs, (int, float)) else "–", _fmt(r.get("weights"))])
    return headers, cells


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    headers, cells = table(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    pairs = [f"- {r['arch']} {r['vs_fc']}" for r in rows if r.get("vs_fc")]
    if pairs:
        lines += ["", "Paired comparisons with fc (test split, same images; DeLong test, 95 % CI of the AUC "
                      "difference):", *pairs]
    return "\n".join(lines) + "\n\n_Research demo — not a diagnosis._\n"


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """study.csv, study.md and study_val_auc.png / study_val_loss.png in ``out_dir``."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "study.csv", "md": out / "study.md", "auc": out / "study_val_auc.png",
             "loss": out / "study_val_loss.png"}
    external = any(r.get("ext_auc") is not None or r.get("ext_wrong") is not None for r in rows)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + (EXTERNAL_COLUMNS if external else ()), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(to_markdown(rows))
    runs = {f"{r['arch']}·{r['level']}": r["history"] for r in rows}
    plots.save(plots.overlaid_validation(runs, "auc"), paths["auc"])
    plots.save(plots.overlaid_validation(runs, "loss"), paths["loss"])
    return paths
