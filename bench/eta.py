#!/usr/bin/env python
"""Time of the whole label-refinery chain at the speeds bench/step.py measured.

    python bench/eta.py STEP.json... [--mode all] [--batch-size 256] [--json OUT.json]
    python bench/eta.py STEP.json... --epochs-within 200 --model efficientnet_ex --batch-size 128

The chain is chain.py's default: b3 70 epochs on hard labels, b3 70 refined by b3, b0 70 refined
by b3, ex 75 refined by b0. An epoch is 150,000 training samples (3 augmented copies of 50,000),
then a 10,000-image test pass. Per stage, with speeds in images/s at one mode and batch size:

    train  = epochs * samples * (1 / student train  [+ 1 / teacher eval])
    test   = epochs * test    * (1 / student eval   [+ 1 / teacher eval])

since a refined step is the student's step plus the teacher's forward on the same batch, and
train.py's test pass of a refined stage also runs the teacher (for agreement). Where the student's
JSON also has a `refined/MODE` row with that very teacher, the directly measured refined step is
shown beside the sum (`measured`). --epochs-within prints how many epochs of a model fit a time
budget (gpu.sh uses it to size its training run).
"""
import os
import sys

# `python bench/NAME.py` puts bench/ on sys.path, not the root that holds the project's packages.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
from micronet_cifar100 import errors
import models
from bench.common import fmt, load_results, markdown_table, parser, write_json
from micronet_cifar100.cli import args as cli_args
from micronet_cifar100.cli.errors import run_main

# One epoch of the original entry's recipe: 3 augmented copies of the 50,000 training images.
SAMPLES_PER_EPOCH = data.copies("uci") * data.TRAIN_IMAGES
TEST_SAMPLES = data.TEST_IMAGES
# (student, teacher or None, epochs): chain.py's default stages with each model's own regime.
CHAIN = tuple((name, models.UCI_CHAIN[i - 1] if i else None, models.card(name).epochs)
              for i, name in enumerate(models.UCI_CHAIN))
# Full-size scaling of each model: only such results stand for the chain's models.
FULL_SIZE = {name: (models.card(name).width, models.card(name).depth) for name in models.names()}
SHORT = {name: name.replace("efficientnet_", "") for name in models.names()}


def speeds_from_docs(docs, full_size_only=True):
    """{(model, batch_size): {mode: row}} from step results; results of the same model and batch
    size merge, the first one holding a mode keeps it. A refined row records its teacher."""
    speeds = {}
    for doc in docs:
        if doc.get("bench") != "step":
            continue
        model = doc["model"]
        if full_size_only and FULL_SIZE.get(model) != (doc.get("width_mult"), doc.get("depth_mult")):
            continue
        entry = speeds.setdefault((model, doc["batch_size"]), {})
        for mode, row in doc.get("modes", {}).items():
            if "train_images_per_s" in row and mode not in entry:
                entry[mode] = dict(row, teacher=doc.get("teacher") if mode.startswith("refined/") else None)
    return speeds


def _pick(speeds, model, batch, modes):
    entry = speeds.get((model, batch), {})
    for mode in modes:
        row = entry.get(mode)
        if row and row.get("train_images_per_s") and row.get("eval_images_per_s"):
            return mode, row
    return None, None


def epoch_seconds(row):
    """(train, test) seconds of one epoch at a step bench row's speeds."""
    return SAMPLES_PER_EPOCH / row["train_images_per_s"], TEST_SAMPLES / row["eval_images_per_s"]


def stage_time(speeds, student, teacher, epochs, batch, modes):
    """Seconds of one stage: the sum formula, and the measured refined step where there is one."""
    out = {"student": student, "teacher": teacher, "epochs": epochs}
    mode, s = _pick(speeds, student, batch, modes)
    if s is None:
        return dict(out, error=f"no {'/'.join(modes)} result for {student} at batch {batch}")
    train, test = epoch_seconds(s)
    out.update(mode=mode, student_train_images_per_s=s["train_images_per_s"])
    if teacher:
        # The teacher in the student's mode where measured; else the next fallback (the table says).
        t_modes = [mode] + [m for m in modes if m != mode]
        t_mode, t = _pick(speeds, teacher, batch, t_modes)
        if t is None:
            out["error"] = f"no {'/'.join(t_modes)} result for teacher {teacher} at batch {batch}"
            return out
        # The teacher's forward on every training and test batch (refinery.Refinery, the test's agreement).
        train += SAMPLES_PER_EPOCH / t["eval_images_per_s"]
        test += TEST_SAMPLES / t["eval_images_per_s"]
        out.update(teacher_eval_images_per_s=t["eval_images_per_s"], teacher_mode=t_mode)
        r = speeds.get((student, batch), {}).get("refined/" + mode)
        if r and r.get("teacher") == teacher and r.get("eval_images_per_s"):
            out.update(measured_refined_train_images_per_s=r["train_images_per_s"],
                       measured_seconds=epochs * sum(epoch_seconds(r)))
    out.update(train_seconds=epochs * train, test_seconds=epochs * test)
    out.update(seconds=out["train_seconds"] + out["test_seconds"], epoch_seconds=train + test)
    return out


def chain_eta(speeds, batch, modes):
    stages = [stage_time(speeds, s, t, e, batch, modes) for s, t, e in CHAIN]
    ok = all("seconds" in st for st in stages)
    measured = [st.get("measured_seconds", st.get("seconds")) for st in stages]
    return {"batch_size": batch, "modes": list(modes), "samples_per_epoch": SAMPLES_PER_EPOCH,
            "test_samples": TEST_SAMPLES, "stages": stages,
            "seconds": sum(st["seconds"] for st in stages) if ok else None,
            "seconds_with_measured_refined": sum(measured) if ok and None not in measured else None}


def epochs_within(speeds, model, batch, modes, budget_s, overhead_s=0.0):
    """Whole epochs of `model` on hard labels that fit budget_s after overhead_s; at least 1."""
    _, s = _pick(speeds, model, batch, modes)
    return None if s is None else max(1, int((budget_s - overhead_s) // sum(epoch_seconds(s))))


def hours(seconds):
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def format_eta(eta):
    rows = []
    for i, st in enumerate(eta["stages"], 1):
        who = SHORT.get(st["student"], st["student"]) + (
            f" <- {SHORT.get(st['teacher'], st['teacher'])}" if st["teacher"] else " (hard labels)")
        if "error" in st:
            rows.append([i, who, st["epochs"], "-", "-", "-", "-", st["error"]])
            continue
        mode = st["mode"] + (f" (teacher {st['teacher_mode']})"
                             if st.get("teacher_mode") not in (None, st["mode"]) else "")
        rows.append([i, who, st["epochs"], mode, fmt(st["student_train_images_per_s"]),
                     fmt(st.get("teacher_eval_images_per_s")), f"{st['epoch_seconds']:.1f} s",
                     hours(st["seconds"]) + (f" (measured step: {hours(st['measured_seconds'])})"
                                             if "measured_seconds" in st else "")])
    table = markdown_table(["stage", "model", "epochs", "mode", "student train img/s",
                            "teacher eval img/s", "per epoch", "stage time"], rows)
    return (f"Chain ETA at batch {eta['batch_size']} ({eta['samples_per_epoch']:,} samples + "
            f"{eta['test_samples']:,} test images per epoch):\n{table}\n"
            f"total: {hours(eta['seconds'])}"
            + (f"; with the directly measured refined steps: {hours(eta['seconds_with_measured_refined'])}"
               if eta.get("seconds_with_measured_refined") not in (None, eta["seconds"]) else ""))


def build_parser():
    p = parser(__doc__)
    p.add_argument("files", nargs="+", help="step JSONs, or folders holding them")
    p.add_argument("--mode", default="all", help="mode whose speeds to use")
    p.add_argument("--fallback-modes", default="all-eager,eager-fp32",
                   help="used, in order, for a model that lacks --mode (the table says which)")
    p.add_argument("--batch-size", type=cli_args.positive_int, nargs="*", default=None,
                   help="batch sizes to report (default: every one found)")
    p.add_argument("--any-width", action="store_true", help="also use narrowed models' results")
    p.add_argument("--epochs-within", type=cli_args.positive_float, default=None, metavar="SECONDS",
                   help="print only how many epochs of --model fit in SECONDS")
    p.add_argument("--overhead", type=cli_args.nonneg_float, default=0.0,
                   help="seconds to set aside (with --epochs-within)")
    p.add_argument("--model", type=cli_args.model_name, default="efficientnet_ex")
    p.add_argument("--json", default=None)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    speeds = speeds_from_docs(load_results(a.files), full_size_only=not a.any_width)
    modes = [a.mode] + [m for m in a.fallback_modes.split(",") if m and m != a.mode]
    batches = a.batch_size or sorted({b for _, b in speeds})
    if a.epochs_within is not None:
        # gpu.sh reads the one number printed; nothing printed means no speed of --model was found.
        n = epochs_within(speeds, a.model, batches[0] if batches else None, modes, a.epochs_within, a.overhead)
        print(n if n is not None else "")
        return 0 if n is not None else 1
    if not batches:
        raise errors.RunError("no full-size step results found (use --any-width for narrowed models)")
    etas = [chain_eta(speeds, b, modes) for b in batches]
    for eta in etas:
        print(format_eta(eta) + "\n")
    if a.json:
        write_json(a.json, {"bench": "eta", "chain": [list(c) for c in CHAIN], "etas": etas})
    return 0 if any(e["seconds"] is not None for e in etas) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
