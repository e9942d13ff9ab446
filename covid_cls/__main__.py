"""Command line: python -m covid_cls train | evaluate | predict | study | demo-data.

Every command calls the same library functions the app uses; progress is shown with tqdm.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

DISCLAIMER = "Research demo — not a diagnosis."


def _config_args(p: argparse.ArgumentParser, with_arch: bool = True) -> None:
    from .config import LOSSES, OPTIMIZERS, SCHEDULES
    from .models import LEVELS

    p.add_argument("--data", required=True, help="dataset folder: train/ validation/ test/ x infected/ normal/")
    if with_arch:
        p.add_argument("--arch", default="resnet18", choices=["resnet18", "vgg16"])
        p.add_argument("--level", default="fc", choices=LEVELS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=0, help="0 = suit the device (64 CUDA, 16 CPU)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--schedule", default="none", choices=SCHEDULES)
    p.add_argument("--loss", default="ce", choices=LOSSES)
    p.add_argument("--weights", default="auto", help="auto | imagenet | none | path to a torchvision state_dict")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--out", default="checkpoints", help="where checkpoints are written")
    p.add_argument("--workers", type=int, default=0, help="decode threads (0 = all cores)")


def _config(a: argparse.Namespace, **over):
    from .config import TrainConfig

    kw = dict(data_dir=a.data, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, optimizer=a.optimizer,
              schedule=a.schedule, loss=a.loss, weights=a.weights, image_size=a.image_size,
              augment=not a.no_augment, seed=a.seed, device=a.device, precision=a.precision, out_dir=a.out,
              num_workers=a.workers)
    if hasattr(a, "arch"):
        kw.update(arch=a.arch, level=a.level)
    kw.update(over)
    return TrainConfig(**kw)


class _Progress:
    """Turns engine events into tqdm bars and log lines."""

    def __init__(self, prefix: str = ""):
        from tqdm import tqdm

        self.tqdm, self.bar, self.prefix = tqdm, None, prefix

    def _bar(self, total: int, desc: str):
        if self.bar is None or self.bar.desc != desc or self.bar.total != total:
            self.close()
            self.bar = self.tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, e: dict) -> None:
        t = e["type"]
        p = self.prefix + (f"[{e['run']}/{e['runs']} {e['name']}] " if "run" in e and t != "run" else "")
        if t == "decode":
            bar = self._bar(e["total"], f"{p}decoding {e['split']}")
            bar.n = e["done"]
            bar.refresh()
        elif t == "step":
            bar = self._bar(e["steps"], f"{p}epoch {e['epoch']}/{e['epochs']}")
            bar.n = e["step"]
            bar.set_postfix(loss=f"{e['loss']:.4f}", img_s=f"{e['images_per_s']:.0f}", refresh=True)
        elif t == "epoch":
            self.close()
            v = e["val"]
            self.tqdm.write(f"{p}epoch {e['epoch']}/{e['epochs']}  train loss {e['train']['loss']:.4f} "
                            f"acc {e['train']['accuracy']:.3f} | val loss {v.get('loss', float('nan')):.4f} "
                            f"acc {v.get('accuracy') or 0:.3f} AUC {v.get('auc') or 0:.3f} "
                            f"sens {v.get('sensitivity') or 0:.3f} spec {v.get('specificity') or 0:.3f} "
                            f"({e['seconds']:.1f}s)")
        elif t in ("log", "error", "stopped"):
            self.close()
            self.tqdm.write(f"{p}{e['message']}")
        elif t == "run":
            self.tqdm.write(f"=== run {e['run']}/{e['runs']}: {e['name']} ===")


def _metrics_line(m: dict) -> str:
    f = lambda k: "–" if m.get(k) is None else f"{m[k]:.3f}"  # noqa: E731
    return (f"n={m['n']}  acc {f('accuracy')}  sens {f('sensitivity')}  spec {f('specificity')}  "
            f"prec {f('precision')}  F1 {f('f1')}  AUC {f('auc')}  ECE {f('ece')}")


def cmd_train(a) -> int:
    from .engine import fit

    prog = _Progress()
    path = fit(_config(a), on_event=prog)
    prog.close()
    card = json.loads(Path(path).with_suffix(".json").read_text())
    print(f"saved {path}  (best epoch {card['best_epoch']}, temperature {card['temperature']:.3f}, "
          f"weights: {card['weights_note']})")
    for split in ("validation", "test"):
        print(f"  {split:<10} {_metrics_line(card['metrics'][split])}")
    print(DISCLAIMER)
    return 0


def cmd_evaluate(a) -> int:
    from .engine import evaluate_checkpoint

    r = evaluate_checkpoint(a.checkpoint, a.data, split=a.split, device=a.device)
    print(f"{Path(a.checkpoint).name} on {a.data} [{a.split}]  weights: {r['weights_origin']}")
    print(f"  all        {_metrics_line(r)}")
    for name, m in r["subsets"].items():
        print(f"  subset: {name}\n             {_metrics_line(m)}")
    if r["skipped"]:
        print(f"  skipped {len(r['skipped'])} unreadable file(s)")
    print(DISCLAIMER)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    if a.plots:
        import numpy as np

        from . import plots

        out = Path(a.plots)
        out.mkdir(parents=True, exist_ok=True)
        plots.save(plots.confusion(r["confusion"], f"confusion ({a.split})"), out / "confusion.png")
        from .metrics import roc_curve

        pos = r["classes"].index("infected")
        fpr, tpr, _ = roc_curve(np.array(r["labels"]) == pos, np.array(r["probs"])[:, pos])
        plots.save(plots.roc({a.split: (fpr, tpr, r["auc"])}), out / "roc.png")
        print(f"plots in {out}/ (confusion.png, roc.png)")
    return 0


def cmd_predict(a) -> int:
    from .imaging import ImageError
    from .predictor import Predictor

    pred = Predictor(a.checkpoints, device=a.device)
    out = Path(a.overlay_dir) if a.overlay_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    status = 0
    for img in a.images:
        try:
            p = pred.predict(img, arch=a.arch, level=a.level, checkpoint=a.checkpoint)
        except ImageError as exc:
            print(f"{img}: {exc}", file=sys.stderr)
            status = 1
            continue
        probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probs.items())
        origin = " (trained from scratch)" if p.card.get("weights_origin") == "scratch" else ""
        print(f"{img}: {p.label}  ({probs})  [{Path(p.checkpoint).name}{origin}, {p.device}, {p.latency_ms:.0f} ms]")
        if p.ood.get("flagged"):
            print("  WARNING: this does not look like the chest X-rays this model was trained on: "
                  + "; ".join(p.ood["reasons"]))
        if out:
            p.overlay.save(out / f"{Path(img).stem}_gradcam.png")
    print(DISCLAIMER)
    return status


def cmd_study(a) -> int:
    from .study import run_study, to_markdown, write_outputs

    prog = _Progress()
    rows = run_study(_config(a, arch="resnet18", level="fc"), archs=a.archs, levels=a.levels, on_event=prog)
    prog.close()
    paths = write_outputs(rows, a.report)
    print(to_markdown(rows))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo_data(a) -> int:
    from .synthetic import make_demo_dataset

    root = make_demo_dataset(a.dir, n_per_class=a.n, size=a.size, seed=a.seed)
    print(f"wrote SYNTHETIC demo data to {root} (not medical images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import LEVELS

    ap = argparse.ArgumentParser(prog="python -m covid_cls", description=f"Chest X-ray fine-tuning lab. {DISCLAIMER}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="fine-tune one model")
    _config_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", help="write all results (incl. per-image probabilities) here")
    p.add_argument("--plots", help="folder for confusion.png and roc.png")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("predict", help="classify images and save Grad-CAM overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "vgg16"])
    p.add_argument("--level", default="fc", choices=LEVELS)
    p.add_argument("--checkpoint", help="a specific .pt (default: the best for arch/level)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder searched for the best checkpoint")
    p.add_argument("--overlay-dir", help="save <name>_gradcam.png overlays here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("study", help="train every arch x level with shared settings; table + plots")
    _config_args(p, with_arch=False)
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--report", default="study", help="folder for study.csv, study.md and plots")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("demo-data", help="write a SYNTHETIC demo dataset")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=40, help="train images per class (val/test get half)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo_data)

    a = ap.parse_args(argv)
    from .checkpoints import CheckpointError
    from .data import DatasetError
    from .engine import TrainingError, TrainingStopped
    from .imaging import ImageError
    from .models import WeightsUnavailable
    from .predictor import NoCheckpointError

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="covid_cls.models")  # shown as log events
    try:
        return a.fn(a)
    except (DatasetError, CheckpointError, TrainingError, ImageError, NoCheckpointError, WeightsUnavailable,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingStopped):
        print("stopped; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
