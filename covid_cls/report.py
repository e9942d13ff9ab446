"""Plain-text wording of evaluation results, shared by the CLI, the Study table and the app.

One place decides how a metric with its interval reads (``AUC 0.903 [0.851, 0.947]``), how the abstention
rule's behaviour is summarised and how a paired comparison is worded, so that the three front-ends say the
same thing in the same words. Pure functions over the dicts ``evaluation`` and ``metrics`` return.
"""

from __future__ import annotations

import math
from typing import Any

DISCLAIMER = "Research demo — not a diagnosis. Do not use for clinical decisions."
UNCERTAIN = "uncertain — outside what this model was trained on"   # the headline of an abstention

# the metrics shown with their intervals, in display order: (key, short name)
CI_METRICS = (("auc", "AUC"), ("sensitivity", "sens"), ("specificity", "spec"), ("f1", "F1"), ("ece", "ECE"))


def num(v: Any, digits: int = 3) -> str:
    """A number, or "–" when missing / not finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def interval(ci: Any, digits: int = 3) -> str:
    """``[low, high]``, or "" when there is no (finite) interval."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or "–" in (num(ci[0]), num(ci[1])):
        return ""
    return f"[{num(ci[0], digits)}, {num(ci[1], digits)}]"


def with_ci(m: dict | None, key: str, digits: int = 3) -> str:
    """``m[key]`` with its 95 % interval from ``m["ci"][key]``: "0.903 [0.851, 0.947]" (just the value when
    the interval is missing, "–" when the value is)."""
    m = m or {}
    value = num(m.get(key), digits)
    ci = interval((m.get("ci") or {}).get(key), digits)
    return f"{value} {ci}" if ci and value != "–" else value


# with more than two classes these are unweighted means of the per-class (one-vs-rest) values; ECE and accuracy
# are not averages, so they keep their plain names
MACRO_KEYS = ("auc", "sensitivity", "specificity", "f1")


def _label(m: dict, key: str, name: str) -> str:
    return f"macro {name}" if m.get("per_class") and key in MACRO_KEYS else name


def metrics_line(m: dict | None) -> str:
    """One line: n, then every CI metric with its interval, then accuracy ("macro AUC ..." etc. when ``m`` has
    ``per_class``; :func:`per_class_lines` gives the classes' own numbers)."""
    m = m or {}
    parts = [f"n={m.get('n', '–')}"] + [f"{_label(m, key, name)} {with_ci(m, key)}" for key, name in CI_METRICS]
    return "  ".join(parts + [f"acc {num(m.get('accuracy'))}"])


def per_class_lines(m: dict | None) -> list[str]:
    """One line per class of a multi-class metrics dict, e.g. "covid: AUC 0.951 [0.912, 0.980]  sens 0.900
    spec 0.970  n=40" (AUC, sensitivity, specificity one-vs-rest); [] for a binary one."""
    return [f"{name}: AUC {with_ci(pc, 'auc')}  sens {num(pc.get('sensitivity'))}  "
            f"spec {num(pc.get('specificity'))}  n={pc.get('n', '–')}"
            for name, pc in ((m or {}).get("per_class") or {}).items()]


def compared_images(r: dict) -> str:
    """What a ``compare_checkpoints`` result was measured on and which AUC: "12 infected, 12 normal" for two
    classes; "8 covid, 8 normal, 8 pneumonia; macro one-vs-rest AUC" for more."""
    if r.get("about") == "macro":
        counts = ", ".join(f"{n} {c}" for c, n in zip(r["classes"], r["class_counts"]))
        return f"{counts}; macro one-vs-rest AUC"
    return f"{r['n_pos']} {r['about']}, {r['n_neg']} {r['rest']}"


def threshold_text(threshold: float | None, positive: str = "infected", n_classes: int = 2) -> str:
    if n_classes > 2:  # no single positive class: the decision is always the most probable of the classes
        return f"most probable of {n_classes} classes (argmax)"
    if threshold is None:
        return "most probable class (argmax, P = 0.5)"
    return f"P({positive}) >= {threshold:.3f} (chosen on validation)"


def pct(v: Any, digits: int = 1) -> str:
    return "–" if num(v) == "–" else f"{100 * v:.{digits}f} %"


def selective_line(sel: dict | None) -> str:
    """"12.0 % of images flagged; 18 of 40 wrong answers flagged (45.0 %); accuracy of the rest 0.912;
    AURC 0.081"."""
    sel = sel or {}
    if not sel:
        return "no abstention rule applied"
    wrong, caught = sel.get("wrong", 0), sel.get("wrong_flagged", 0)
    share = f" ({pct(sel.get('wrong_flagged_share'))})" if wrong else ""
    return (f"{pct(sel.get('flagged'))} of images flagged; {caught} of {wrong} wrong answers flagged{share}; "
            f"accuracy of the answered {num(sel.get('answered_accuracy'))}; AURC {num(sel.get('aurc'))}")


def reasons_line(sel: dict | None) -> str:
    """Share of images each signal flags, e.g. "features unlike the training X-rays 10.0 %; ..."."""
    by = (sel or {}).get("by_reason") or {}
    return "; ".join(f"{why} {pct(v)}" for why, v in by.items())


def duplicates_line(dup: dict | None, n: int | None = None) -> str:
    dup = dup or {}
    if not dup.get("checked"):
        return f"not checked ({dup.get('note', 'no training-image hashes')})"
    count = dup.get("count", 0)
    of = f" of {n}" if n else ""
    if not count:
        return f"none{of}"
    return f"{count}{of} evaluated images nearly duplicate a training image (these prove nothing)"


def signed(v: Any, digits: int = 3) -> str:
    return "–" if num(v) == "–" else f"{v:+.{digits}f}"


def p_text(p: Any) -> str:
    """"p=0.41", "p<0.001" or "p=–"."""
    if num(p) == "–":
        return "p=–"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def verdict(res: dict, name_a: str = "A", name_b: str = "B") -> str:
    """"no significant difference" / "A is better" / "cannot compare", from a paired_auc_test result."""
    p, diff = res.get("p_value"), res.get("diff")
    if num(p) == "–" or num(diff) == "–":
        return "cannot compare (each class needs at least 2 images)"
    if p < res.get("alpha", 0.05):
        return f"{name_a if diff > 0 else name_b} is better"
    return "no significant difference"


def comparison_line(res: dict, name_a: str = "A", name_b: str = "B") -> str:
    """"partial vs fc: +0.012 AUC [-0.020, 0.040], p=0.41: no significant difference" (difference = A - B,
    DeLong interval)."""
    ci = interval([res.get("ci_low"), res.get("ci_high")])
    return (f"{name_a} vs {name_b}: {signed(res.get('diff'))} AUC {ci}, {p_text(res.get('p_value'))}: "
            f"{verdict(res, name_a, name_b)}").replace("  ", " ")


__all__ = ["CI_METRICS", "num", "interval", "with_ci", "metrics_line", "per_class_lines", "compared_images",
           "threshold_text", "pct",
           "selective_line", "reasons_line", "duplicates_line", "signed", "p_text", "verdict", "comparison_line"]


def leakage_text(found: dict | None, n_images: int = 0, limit: int = 0) -> str:
    """Scan's line about near-duplicate images across splits (markdown); ``found`` None = not checked."""
    if found is None:
        return (f"  \nNear-duplicate check: {n_images:,} images is more than Scan decodes ({limit:,}); "
                "training runs it and logs any pair it finds.")
    if not found["count"]:
        return "  \nNear-duplicates across splits: none found (perceptual hash)."
    pairs = "".join(f"\n- `{p['a']}` ~ `{p['b']}` (distance {p['distance']})" for p in found["pairs"][:10])
    return (f"  \n**⚠️ {found['count']} near-duplicate pair(s) across splits** — a test image seen in training "
            f"makes every metric look better than it is:{pairs}")


METRIC_HEADERS = ["split", "AUC [95% CI]", "sensitivity [95% CI]", "specificity [95% CI]", "F1 [95% CI]",
                  "ECE [95% CI]", "accuracy", "n"]


def metrics_rows(metrics: dict, splits: tuple[str, ...] = ("validation", "test")) -> list[list]:
    """One row per split: each metric with its 95 % bootstrap interval ("0.903 [0.851, 0.947]").

    A multi-class split (its metrics have ``per_class``) is labelled "<split> (macro)" and followed by one row
    per class, "<split> · <class>": one-vs-rest AUC (with its interval when there is one), sensitivity,
    specificity and F1, the class's image count, and "–" for ECE and accuracy (not per-class quantities).
    """
    rows = []
    for split in splits:
        m = metrics.get(split) or {}
        per_class = m.get("per_class") or {}
        rows.append([f"{split} (macro)" if per_class else split]
                    + [with_ci(m, k) for k in ("auc", "sensitivity", "specificity", "f1", "ece")]
                    + [num(m.get("accuracy")), m.get("n")])
        rows += [[f"{split} · {name}", with_ci(pc, "auc"), num(pc.get("sensitivity")),
                  num(pc.get("specificity")), num(pc.get("f1")), "–", "–", pc.get("n")]
                 for name, pc in per_class.items()]
    return rows
