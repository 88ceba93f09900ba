"""The run folder: its name, its lock, finding a run to resume, its log, and the files derived from
its state (status.json, metrics.csv, curves.png, args.json).

The one source of truth about a run is its `last.pytar` (engine.saver): position, best epoch,
history, arguments, finished or not. Everything else in the folder (status.json, metrics.csv,
curves.png) is derived from it and rewritten from it whenever the run is opened, so a kill or a
full disk between two writes can damage those files but never the run.
"""
import csv
import datetime
import fcntl
import glob
import io
import json
import os
import sys
import tempfile

from micronet_cifar100 import errors

from .checkpoint import TMP_PREFIX, load_file, write_atomic
from .config import identity_diff

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                 "images_per_s", "seconds")
REFINED_FIELDS = ("train_agreement", "test_agreement")
LOCK_FILE = ".lock"


def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text), binary=False)


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_name(model, coslinear, refined, when=None):
    when = when or datetime.datetime.now()
    return f"{model}{'_cos' if coslinear else ''}{'_rfn' if refined else ''}_{when:%Y-%m-%d-%H-%M-%S}"


def check_save_root(root):
    """Fail before training when the save root cannot take a checkpoint."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise errors.storage_error(root, e, doing="create the save folder", setting="save") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise errors.StorageError(f"the save folder {root} is not writable (permission denied)", setting="save",
                                  cause="denied")
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=root)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise errors.storage_error(root, e, doing="write into the save folder", setting="save") from None
    finally:
        if probe and os.path.exists(probe):
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
        except OSError as e:
            raise errors.storage_error(path, e) from None


def remove_temporaries(folder):
    """Half-written temporary files left by a killed write (only under the run's lock)."""
    for path in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
        try:
            os.unlink(path)
        except OSError:
            pass


class RunLock:
    """An exclusive lock on a run folder while a process trains in it (flock: released by the
    kernel when the process dies, so a killed run never leaves a stale lock behind). Used as a
    context manager, it releases whatever it acquired on any exit, error or not."""

    def __init__(self):
        self.folder = self.fd = None

    def acquire(self, folder):
        path = os.path.join(folder, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise errors.storage_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise errors.RunError(f"the run {folder} is in use by process {holder}; wait for it "
                                  "to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.folder, self.fd = folder, fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.folder = self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_state(folder):
    """A run's last.pytar, or None when it has none or it is damaged. Memory-mapped, so that the
    weights are not copied into memory; the checksum still reads every byte once."""
    path = os.path.join(folder, "last.pytar")
    if not os.path.isfile(path):
        return None
    try:
        return load_file(path, mmap=True)
    except errors.CheckpointError:
        return None


def find_run(root, settings):
    """The newest run folder under root whose last.pytar has these identity settings, finished or
    not, or None. Only last.pytar is trusted; a damaged status.json or args.json changes nothing."""
    best = None
    for path in glob.glob(os.path.join(root, "*", "last.pytar")):
        folder = os.path.dirname(path)
        state = read_state(folder)
        if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
            continue
        if identity_diff(state["args"], settings):
            continue
        mtime = os.path.getmtime(path)
        if best is None or mtime > best[0]:
            best = (mtime, folder)
    return best[1] if best else None


class RunLog:
    """Prints on the main rank and appends the same lines to log.txt (flushed line by line). A log
    file that cannot be written any more (disk full) is dropped with one warning: the console keeps
    every line and the run goes on."""

    def __init__(self, path=None, enabled=True):
        self.enabled = enabled
        self.file = None
        self.bar_active = False
        if path:
            self.attach(path)

    def attach(self, path):
        if self.enabled and self.file is None:
            try:
                self.file = open(path, "a", buffering=1)
            except OSError as e:
                raise errors.storage_error(path, e) from None

    def __call__(self, msg=""):
        if not self.enabled:
            return
        if self.bar_active:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        if self.file:
            try:
                self.file.write(msg + "\n")
            except OSError as e:
                self.file = None
                print(f"warning: log.txt can no longer be written ({e.strerror}); logging to the console "
                      "only", flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.file:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


def write_metrics(folder, history, refined):
    fields = METRIC_FIELDS + (REFINED_FIELDS if refined else ()) + \
        (("sparsity",) if any("sparsity" in row for row in history) else ())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(os.path.join(folder, "metrics.csv"), buf.getvalue())


def draw_curves(path, history, title=""):
    """Loss and accuracy per epoch. Returns None, or the reason it could not draw: drawing never
    stops training."""
    if not history:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    tmp = None
    try:
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
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=80, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        tmp = None
        return None
    except Exception as e:  # any failure to draw (disk full, a broken backend) only costs the picture
        plt.close("all")
        return errors.first_line(f"{type(e).__name__}: {e}")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_derived(folder, state, refined, log):
    """status.json, metrics.csv and curves.png from a run's state; curves that cannot be drawn
    only cost a warning."""
    write_json(os.path.join(folder, "status.json"), status_of(state))
    write_metrics(folder, state.history, refined)
    problem = draw_curves(os.path.join(folder, "curves.png"), state.history, os.path.basename(folder))
    if problem:
        log(f"warning: curves.png not drawn ({problem}); training goes on")


def status_of(state):
    """status.json: where the run stands (for people and scripts; the run itself trusts last.pytar)."""
    return {"next_epoch": state.next_epoch, "next_step": state.next_step, "finished": state.finished,
            "best": state.best}
