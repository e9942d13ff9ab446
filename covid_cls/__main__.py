"""Command line: python -m covid_cls train | evaluate | compare | predict | study | migrate | demo-data | push | pull.

Every command calls the same library functions the app uses; progress is shown with tqdm. The training
options are generated from ``TrainConfig``'s fields (help text, choices and defaults live there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import Field, fields
from pathlib import Path

from . import events as ev
from . import tracking
from .config import TrainConfig, choices_of
from .errors import CovidClsError

DISCLAIMER = "Research demo — not a diagnosis."


def option_flag(f: Field) -> str:
    """The CLI flag of a TrainConfig option: ``--batch-size``, ``--no-augment`` (a default-on switch), or
    the field's own ``flag`` (``--data``, ``--out``, ``--workers``)."""
    name = f.name.replace("_", "-")
    if f.default is True:
        return f"--no-{name}"
    return f.metadata.get("flag") or f"--{name}"


def add_option(p: argparse.ArgumentParser, f: Field, explicit_only: bool = False, **override) -> None:
    """One flag for one TrainConfig field, from its metadata (help, choices, required) and default.

    ``explicit_only``: a flag the user did not give leaves no attribute (so that a recipe's settings are
    overridden only by what was typed)."""
    meta, default, flag = f.metadata, f.default, option_flag(f)
    kw: dict = {"dest": f.name, "help": meta["help"]}
    if isinstance(default, bool):
        kw.update(action="store_false" if default else "store_true",
                  help=("switch off " if default else "switch on ") + meta["help"])
    elif isinstance(default, tuple):
        kw.update(nargs=len(default), type=type(default[0]), metavar=("MIN", "MAX"))
    else:
        choices = choices_of(f)
        kw.update(type=type(default), choices=choices,
                  metavar=None if choices else flag.lstrip("-").replace("-", "_").upper())
    if meta.get("required"):
        kw["required"] = True
    else:
        kw["default"] = argparse.SUPPRESS if explicit_only else default
        if not isinstance(default, bool):
            kw["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
    kw.update(override)
    p.add_argument(flag, **kw)


def add_config_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A flag for every TrainConfig option (except ``skip``); only the flags given end up in the namespace."""
    for f in fields(TrainConfig):
        if f.name not in skip:
            add_option(p, f, explicit_only=True)


def _config(a: argparse.Namespace) -> TrainConfig:
    """The options given on the command line, on top of the chosen recipe (none: TrainConfig's defaults)."""
    given = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if hasattr(a, f.name)}
    return TrainConfig.from_recipe(given.pop("recipe", "custom"), **given)


def _field(name: str) -> Field:
    return next(f for f in fields(TrainConfig) if f.name == name)


class _Progress:
    """Turns engine events into tqdm bars (decode, step) and log lines (``events.describe``)."""

    def __init__(self):
        from tqdm import tqdm

        self.tqdm, self.bar = tqdm, None

    def _bar(self, total: int, desc: str):
        if self.bar is None or self.bar.desc != desc or self.bar.total != total:
            self.close()
            self.bar = self.tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, ev.Decode):
            bar = self._bar(e.total, f"{e.prefix}decoding {e.split}")
            bar.n = e.done
            bar.refresh()
        elif isinstance(e, ev.Step):
            bar = self._bar(e.steps, f"{e.prefix}epoch {e.epoch}/{e.epochs}")
            bar.n = e.step
            bar.set_postfix(loss=f"{e.loss:.4f}", img_s=f"{e.images_per_s:.0f}", refresh=True)
        else:
            line = ev.describe(e)
            if line:
                self.close()
                self.tqdm.write(line)


# --- several processes (issue 13, distributed.py): --gpus N re-runs this command under torchrun --------
def add_launch_args(p: argparse.ArgumentParser) -> None:
    """``--gpus N`` and the torchrun options it passes through (see distributed.torchrun_command)."""
    from .distributed import TORCHRUN_FLAGS, TORCHRUN_OPTIONS

    g = p.add_argument_group("several processes", "--gpus N execs torchrun --nproc-per-node=N -m covid_cls train "
                             "... (one GPU per process, NCCL; with --device cpu: N CPU processes, gloo); these "
                             "torchrun options pass through, e.g. for two nodes --nnodes 2 --rdzv-backend c10d "
                             "--rdzv-endpoint HOST:29500 --rdzv-id RUN")
    g.add_argument("--gpus", type=int, default=0, metavar="N", help="train one model on N GPUs of this node (DDP)")
    for flag in TORCHRUN_OPTIONS:
        g.add_argument(flag, dest=f"torchrun_{flag[2:].replace('-', '_')}", metavar="X", help=argparse.SUPPRESS)
    for flag in TORCHRUN_FLAGS:
        g.add_argument(flag, dest=f"torchrun_{flag[2:]}", action="store_true", help=argparse.SUPPRESS)


def _launch_if_asked(a) -> None:
    """``--gpus N`` outside torchrun: replace this process by torchrun (never returns)."""
    from .distributed import exec_torchrun, launched_world_size

    if getattr(a, "gpus", 0) and launched_world_size() == 1:
        exec_torchrun(a.argv, a.gpus, device=getattr(a, "device", "auto"))
# ------------------------------------------------------------------------------------------------------


def cmd_train(a) -> int:
    from . import report as rp
    from .checkpoints import read_card
    from .distributed import is_main_process
    from .engine import fit

    _launch_if_asked(a)   # --gpus N (issue 13)
    prog = _Progress()
    cfg = _config(a)
    with (tracking.from_args(a, cfg.to_dict()) if is_main_process() else None) or contextlib.nullcontext() as track:
        path = fit(cfg, on_event=tracking.tee(prog, track))   # --track (issue 12); rank 0 only under torchrun
    prog.close()
    if not is_main_process():   # under torchrun: rank 0 prints
        return 0
    card = read_card(path)
    weights = card.weights_note or card.weights_origin
    print(f"checkpoint {path}  (temperature {card.temperature:.3f}, weights: {weights})")
    print(f"  classes    {', '.join(card.classes)}")
    print(f"  threshold  {rp.threshold_text(card.threshold, card.positive, card.num_classes)}")
    if card.calibration_note:
        print(f"  calibration: {card.calibration_note}")
    for split in ("validation", "test"):
        print(f"  {split:<10} {rp.metrics_line(card.split_metrics(split))}")
        for line in rp.per_class_lines(card.split_metrics(split)):   # more than two classes: one per class
            print(f"             {line}")
    print(DISCLAIMER)
    return 0


def cmd_evaluate(a) -> int:
    from . import report as rp
    from .engine import evaluate_checkpoint

    r = evaluate_checkpoint(a.checkpoint, a.data, split=a.split, device=a.device, n_boot=a.boot)
    print(f"{Path(a.checkpoint).name} on {a.data} [{_where(a.data, a.split)}]  weights: {r['weights_origin']}")
    print(f"  threshold  {rp.threshold_text(r['threshold'], r['positive'], len(r['classes']))}; 95 % CIs: "
          f"stratified bootstrap, {a.boot} resamples")
    print(f"  all        {rp.metrics_line(r)}")
    for line in rp.per_class_lines(r):
        print(f"             {line}")
    for name, m in r["subsets"].items():
        print(f"  source: {name}\n             {rp.metrics_line(m)}")
    sel = r["selective"]
    print(f"  selective  {rp.selective_line(sel)}")
    if rp.reasons_line(sel):
        print(f"             flagged by: {rp.reasons_line(sel)}")
    dup = r["duplicates"]
    print(f"  near-duplicates of training images: {rp.duplicates_line(dup, r.get('n'))}")
    for pair in dup.get("pairs", [])[:10]:
        print(f"             {pair['file']} (training image #{pair['train_index']}, distance {pair['distance']})")
    if r["skipped"]:
        print(f"  skipped {len(r['skipped'])} unreadable file(s)")
    for note in r.get("notes", []):
        print(f"  note: {note}")
    print(DISCLAIMER)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    if a.plots:
        _evaluation_plots(r, a.split, Path(a.plots))
    return 0


def _where(data: str, split: str) -> str:
    """The split evaluated, or "flat folder" when ``data`` has no folder for it (class folders directly)."""
    from .data import SPLITS

    return split if any((Path(data) / name).is_dir() for name in SPLITS[split]) else "flat folder"


def _evaluation_plots(r: dict, split: str, out: Path) -> None:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    plots.save(plots.confusion(r["confusion"], f"confusion ({split})",
                               classes=plots.confusion_names(r["classes"], r["positive"])), out / "confusion.png")
    if r.get("roc_per_class"):   # more than two classes: one-vs-rest curve per class
        plots.save(plots.roc_one_vs_rest(r["roc_per_class"], r["per_class"], f"ROC, each class vs the rest ({split})"),
                   out / "roc.png")
    else:
        plots.save(plots.roc({split: (r["roc"]["fpr"], r["roc"]["tpr"], r["auc"])},
                             title=f"ROC (positive: {r['positive']})"), out / "roc.png")
    sel = r["selective"]
    acc = sel.get("answered_accuracy")
    rule = (1.0 - sel["flagged"], 1.0 - acc) if acc is not None else None
    plots.save(plots.risk_coverage(sel["risk_coverage"], sel.get("aurc"), rule), out / "risk_coverage.png")
    print(f"plots in {out}/ (confusion.png, roc.png, risk_coverage.png)")


def cmd_compare(a) -> int:
    from . import report as rp
    from .evaluation import compare_checkpoints

    try:
        r = compare_checkpoints(a.a, a.b, a.data, split=a.split, device=a.device, n_boot=a.boot)
    except ValueError as exc:   # different images or classes: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name_a, name_b = r["names"]
    print(f"{a.data} [{_where(a.data, a.split)}], n={r['n']} ({rp.compared_images(r)}), the same images for both")
    for tag, name, key in (("A", name_a, "a"), ("B", name_b, "b")):
        auc = {"auc": r[f"auc_{key}"], "ci": {"auc": r.get(f"auc_{key}_ci")}}
        print(f"  {tag} {name}: AUC {rp.with_ci(auc, 'auc')}")
    print(f"  difference A - B: {rp.signed(r['diff'])} AUC {rp.interval([r['ci_low'], r['ci_high']])} (DeLong), "
          f"paired bootstrap {rp.interval([r['boot_ci_low'], r['boot_ci_high']])}; {rp.p_text(r['p_value'])}")
    print(f"  verdict: {r['verdict']}")
    print(DISCLAIMER)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


def cmd_predict(a) -> int:
    from .errors import ImageError
    from .predictor import Predictor

    if getattr(a, "csv", None) or any(Path(i).is_dir() or i.lower().endswith(".zip") for i in a.images):
        from .batch import cli_predict  # a folder or a zip, or --csv: batch prediction (issue 12 #3)

        return cli_predict(a, DISCLAIMER)
    pred = Predictor(a.checkpoints, device=a.device)
    out = Path(a.overlay_dir) if a.overlay_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    status = 0
    for img in a.images:
        try:
            p = pred.predict(img, arch=a.arch, level=a.level, checkpoint=a.checkpoint)
        except ImageError as exc:   # one bad file: say so and go on with the others
            print(f"{img}: {exc}", file=sys.stderr)
            status = 1
            continue
        probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probs.items())
        if p.card.threshold is not None:   # the operating point, so that "normal" at P(infected) 0.53 makes sense
            probs += f"; {p.card.positive} when P >= {p.card.threshold:.3f}"
        origin = " (trained from scratch)" if p.card.from_scratch else ""
        print(f"{img}: {p.label}  ({probs})  [{Path(p.checkpoint).name}{origin}, {p.device}, {p.latency_ms:.0f} ms]")
        if p.abstain:   # the headline is "uncertain"; say why, one reason a line
            for why in p.reasons:
                print(f"    - {why}")
        if out:
            p.overlay.save(out / f"{Path(img).stem}_gradcam.png")
    print(DISCLAIMER)
    return status


def cmd_study(a) -> int:
    from .study import run_study, to_markdown, write_outputs

    prog = _Progress()
    cfg = _config(a)
    with tracking.from_args(a, cfg.to_dict(), kind="study") or contextlib.nullcontext() as track:   # --track
        rows = run_study(cfg, archs=a.archs, levels=a.levels, on_event=tracking.tee(prog, track),
                         external=a.external, devices=a.devices)   # --devices: issue 13
    prog.close()
    paths = write_outputs(rows, a.report)
    print(to_markdown(rows))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_migrate(a) -> int:
    """Rewrite every format-1 ``.pt`` checkpoint found in the given folders/files as safetensors."""
    from .checkpoints import LEGACY_SUFFIX, migrate_checkpoint

    status, found = 0, []
    for target in map(Path, a.paths):
        if target.is_dir():
            found += sorted(target.glob(f"*{LEGACY_SUFFIX}"))
        elif target.is_file():
            found.append(target)
        else:
            print(f"{target}: no such file or folder", file=sys.stderr)
            status = 1
    for path in found:
        if path.suffix != LEGACY_SUFFIX:
            print(f"{path}: already safetensors, nothing to do")
            continue
        try:
            new = migrate_checkpoint(path)
        except CovidClsError as exc:   # one bad file: say so and go on with the others
            print(f"{path}: not migrated: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{path} -> {new} (the .pt and its card were removed)")
    if not found and status == 0:
        print("no format-1 .pt checkpoints found in " + ", ".join(a.paths))
    return status


def cmd_demo_data(a) -> int:
    from .synthetic import make_demo_dataset

    classes = tuple(c.strip() for c in a.classes.split(",") if c.strip())
    try:
        root = make_demo_dataset(a.dir, n_per_class=a.n, size=a.size, seed=a.seed, classes=classes)
    except ValueError as exc:   # a class name without a synthetic pattern
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote SYNTHETIC demo data to {root} (classes: {', '.join(classes)}; not medical images)")
    return 0


def _dataset_args(p: argparse.ArgumentParser, json_help: str) -> None:
    """What evaluate and compare share: the images, where results go, the bootstrap size, the device."""
    from .data import SPLITS

    p.add_argument("--data", required=True, help="a split tree, or a flat folder with infected/ normal/ "
                                                 "(e.g. X-rays from another hospital)")
    p.add_argument("--split", default="test", choices=list(SPLITS), help="ignored for a flat folder")
    p.add_argument("--json", help=json_help)
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the CIs (default: %(default)s)")
    add_option(p, _field("device"), help="where to run (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from .models import ARCHS, LEVELS

    ap = argparse.ArgumentParser(prog="python -m covid_cls", description=f"Chest X-ray fine-tuning lab. {DISCLAIMER}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="fine-tune one model")
    add_config_args(p)
    add_launch_args(p)   # --gpus N (issue 13)
    tracking.add_cli_options(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="metrics with 95 %% CIs of a checkpoint on a split or a flat folder")
    p.add_argument("--checkpoint", required=True)
    _dataset_args(p, json_help="write all results (incl. per-image probabilities, risk-coverage) here")
    p.add_argument("--plots", help="folder for confusion.png, roc.png and risk_coverage.png")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("compare", help="two checkpoints on the same images: paired AUC difference and verdict")
    p.add_argument("a", metavar="A", help="checkpoint A")
    p.add_argument("b", metavar="B", help="checkpoint B")
    _dataset_args(p, json_help="write the comparison here")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("predict", help="classify images (files, folders or zips) and save Grad-CAM overlays")
    p.add_argument("images", nargs="+", help="image files, or folders / .zip files of images (batch)")
    p.add_argument("--csv", help="write one row per image here (file, label, decision, probabilities, reasons, "
                   "error)")
    p.add_argument("--max-files", type=int, default=10_000, help="at most this many images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    for name in ("arch", "level"):
        add_option(p, _field(name))
    add_option(p, _field("device"), help="where to run (default: %(default)s)")
    p.add_argument("--checkpoint", help="a specific checkpoint file (default: the best for arch/level)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder searched for the best checkpoint")
    p.add_argument("--overlay-dir", help="save <name>_gradcam.png overlays here")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("study", help="train every arch x level with shared settings; table + plots")
    add_config_args(p, skip=("arch", "level"))
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--report", default="study", help="folder for study.csv, study.md and plots")
    p.add_argument("--external", help="also evaluate every model on this labelled folder (e.g. X-rays from "
                                      "other hospitals; never trained on) and add its columns")
    p.add_argument("--devices", help="run the combinations in parallel, one process per device: GPU numbers "
                                     "(0,1,2,3) or cpu,cpu; the same rows as one after another (issue 13)")
    tracking.add_cli_options(p)
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("migrate", help="rewrite format-1 .pt checkpoints as safetensors")
    p.add_argument("paths", nargs="*", default=["checkpoints"], metavar="DIR_OR_FILE",
                   help="folders (every *.pt in them) or files (default: checkpoints)")
    p.set_defaults(fn=cmd_migrate)

    p = sub.add_parser("demo-data", help="write a SYNTHETIC demo dataset")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=40, help="train images per class (val/test get half)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default="infected,normal",
                   help="comma-separated classes, from: covid, infected, normal, pneumonia "
                        "(e.g. covid,normal,pneumonia for the 3-class demo)")
    p.set_defaults(fn=cmd_demo_data)

    # push | pull: the Hugging Face Hub (issue 12)
    from .hub import add_cli as add_hub_commands

    add_hub_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    a.argv = argv   # --gpus N re-runs the same command line under torchrun
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="covid_cls.models")  # shown as log events
    try:
        return a.fn(a)
    except CovidClsError as exc:   # every error the library raises on purpose carries a message for the user
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
