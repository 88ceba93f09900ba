"""Run folders: naming, args.json, status.json, log.txt, metrics.csv, curves.png, and finding a run
to resume."""
import csv
import datetime
import glob
import io
import json
import os
import sys

from .errors import UserError

# Arguments that define what a run computes: a resume must agree on all of them. The rest (device,
# speed switches, progress, paths) may change between the original run and its resume.
IDENTITY_ARGS = ("model", "width_mult", "depth_mult", "coslinear", "s", "m", "label_smoothing",
                 "lr_regime", "batch_size", "momentum", "weight_decay", "seed", "aug", "train_limit",
                 "test_limit", "label_refinery_model", "label_refinery_state_file",
                 "label_refinery_width_mult", "label_refinery_depth_mult", "refinery_bn",
                 "drop_connect", "dropout", "bn_momentum", "lr_scale", "sync_bn", "nan_policy")

# Not part of a run's identity, but a resume that does not give them keeps the run's values.
INHERITED_ARGS = ("epochs", "data_dir", "eval_batch_size", "checkpoint_every", "keep_epoch_states",
                  "no_download")

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                 "images_per_s", "seconds")
REFINED_FIELDS = ("train_agreement", "test_agreement")


def write_text_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_name(model, coslinear, refined, when=None):
    when = when or datetime.datetime.now()
    return f"{model}{'_cos' if coslinear else ''}{'_rfn' if refined else ''}_{when:%Y-%m-%d-%H-%M-%S}"


def check_save_root(root):
    """Fail before training when the save root cannot take a checkpoint."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --save folder {root}: {e.strerror}; choose a writable "
                        "folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"--save folder {root} is not writable; choose a writable folder or fix "
                        "its permissions")
    probe = os.path.join(root, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write into --save folder {root}: {e.strerror}; free disk space or "
                        "choose another folder") from None
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def create_run_dir(root, model, coslinear, refined):
    """A new folder, never an existing one (a second run in the same second gets a suffix)."""
    base = os.path.join(root, run_name(model, coslinear, refined))
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"


def identity(args_dict):
    return {k: args_dict.get(k) for k in IDENTITY_ARGS}


def identity_diff(a, b):
    ia, ib = identity(a), identity(b)
    return [k for k in IDENTITY_ARGS if ia[k] != ib[k]]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_resumable(root, args_dict):
    """The newest unfinished run under root whose identity arguments equal these."""
    best = None
    for status_path in glob.glob(os.path.join(root, "*", "status.json")):
        folder = os.path.dirname(status_path)
        status, saved = read_json(status_path), read_json(os.path.join(folder, "args.json"))
        if not status or not saved or status.get("finished"):
            continue
        if not os.path.exists(os.path.join(folder, "last.pytar")) or identity_diff(saved, args_dict):
            continue
        mtime = os.path.getmtime(os.path.join(folder, "last.pytar"))
        if best is None or mtime > best[0]:
            best = (mtime, folder)
    return best[1] if best else None


class RunLog:
    """Prints on the main rank and appends the same lines to log.txt (flushed line by line)."""

    def __init__(self, path=None, enabled=True):
        self.enabled = enabled
        self.file = open(path, "a", buffering=1) if (path and enabled) else None
        self.bar_active = False

    def attach(self, path):
        if self.enabled and self.file is None:
            self.file = open(path, "a", buffering=1)

    def __call__(self, msg=""):
        if not self.enabled:
            return
        if self.bar_active:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        if self.file:
            self.file.write(msg + "\n")

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def write_metrics(folder, history, refined):
    fields = METRIC_FIELDS + (REFINED_FIELDS if refined else ())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(os.path.join(folder, "metrics.csv"), buf.getvalue())


def draw_curves(path, history, title=""):
    """Loss and accuracy per epoch; a failure to draw never stops training."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], label="train")
    a.plot(ep, [r["test_loss"] for r in history], label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [r["train_top1"] for r in history], label="train top-1")
    b.plot(ep, [r["test_top1"] for r in history], label="test top-1")
    b.plot(ep, [r["test_top5"] for r in history], label="test top-5")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
