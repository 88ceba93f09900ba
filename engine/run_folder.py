"""The run folder: its name, its lock, finding a run to resume, its log, and the files derived from
its state (status.json, metrics.csv, curves.png, args.json).

The one source of truth about a run is its `last.pytar` (engine.saver): position, best epoch,
history, arguments, finished or not. Everything else in the folder (status.json, metrics.csv,
curves.png, and the weights files) is derived from it and rewritten from it whenever the run is
opened, so a kill or a full disk between two writes can damage those files but never the run.

A folder exists under its final name only once it holds its lock and args.json (create_run_dir), so
every run folder says which run it is for, committed or not: a resume (auto) finds a run killed
before its first commit by its args.json and starts it over there instead of abandoning it.
Temporaries, in a run folder or at the save root, are removed by the next process that opens a run
there, once no live process can still be writing them (remove_leftovers).
"""
import contextlib
import csv
import datetime
import errno
import fcntl
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time

from micronet_cifar100 import errors

from .checkpoint import TMP_PREFIX, fsync_dir, load_file, write_atomic
from .config import identity_diff

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                 "images_per_s", "seconds")
REFINED_FIELDS = ("train_agreement", "test_agreement")
LOCK_FILE = ".lock"
# How long a run's lock is waited for before it counts as held by another run: long enough for a
# remove_leftovers sweep, which holds it for a moment, and far shorter than any run.
LOCK_PATIENCE_S = 1.0


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
    with root_writes(root):
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


def create_run_dir(root, model, coslinear, refined, settings, lock):
    """A new run folder, never an existing one (a second run in the same second gets a suffix),
    locked with `lock` and holding args.json (`settings`) from the moment it has its name: it is made
    under a temporary name at the root and renamed into place, so a kill leaves either a temporary
    (removed by remove_leftovers) or a folder that says which run it is for."""
    base = os.path.join(root, run_name(model, coslinear, refined))
    with root_writes(root):
        try:
            tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root)
        except OSError as e:
            raise errors.storage_error(root, e, doing="create a run folder in") from None
        try:
            lock.acquire(tmp)
            write_json(os.path.join(tmp, "args.json"), settings)
            path = publish_folder(tmp, base)
        except BaseException:
            lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    lock.folder = path
    fsync_dir(root)
    return path


def publish_folder(tmp, base):
    """Rename the folder `tmp` to `base`, or to base-2, base-3... when taken; returns its name."""
    path, n = base, 1
    while True:
        # rename(2) would replace an empty folder of that name: a name in use is skipped first.
        if not os.path.lexists(path):
            try:
                os.rename(tmp, path)
                return path
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise errors.storage_error(path, e, doing="create") from None
        n += 1
        path = f"{base}-{n}"


def remove_temporaries(folder):
    """Half-written temporary files left by a killed write (only under the run's lock)."""
    for path in glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")):
        remove_path(path)


def remove_path(path):
    """A file, or a folder with everything in it; what cannot be removed stays, silently (it is
    tried again at the next opening)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def lock_folder(path, how):
    """An fd holding flock(`how`) on the folder itself, or None when it cannot be had (held by
    another process under LOCK_NB, or a file system without flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
        return fd
    except OSError:
        os.close(fd)
        return None


@contextlib.contextmanager
def root_writes(root):
    """Held while this process has temporaries of its own at the save root (a probe, a folder being
    made, chain_state.json being written): a shared lock on the root folder, which remove_leftovers
    needs exclusively, so that it never removes a temporary still being written. The kernel drops it
    when the process dies, and the temporaries left become removable."""
    fd = lock_folder(root, fcntl.LOCK_SH)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def remove_leftovers(root, keep=None):
    """What killed processes left under a save root: the temporaries at the root (files, and folders
    that were being made), when no live process is writing there (skipped otherwise: the next
    opening removes them); and the temporaries in every run folder that no live process holds.
    `keep`: the caller's own run folder, which it clears under its own lock."""
    fd = lock_folder(root, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is not None:
        try:
            for path in glob.glob(os.path.join(glob.escape(root), TMP_PREFIX + "*")):
                remove_path(path)
        finally:
            os.close(fd)
    keep = os.path.abspath(keep) if keep else None
    for folder in glob.glob(os.path.join(glob.escape(root), "*", "")):
        folder = os.path.dirname(folder)
        if os.path.abspath(folder) == keep or not glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")):
            continue
        try:  # only a folder with a lock file is a run folder; none is created in any other
            lock_fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_temporaries(folder)
        except OSError:  # held: a live run, which clears its own
            pass
        finally:
            os.close(lock_fd)


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
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
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
    """The newest run folder under root of these identity settings, finished or not, or None. A
    folder with a last.pytar is that file's run (a damaged status.json or args.json changes nothing;
    a damaged last.pytar makes it no candidate); a folder without one is a run killed before its
    first commit, and its args.json says whose (none readable: no candidate). Newest: by the time of
    last.pytar, or of args.json when there is no commit."""
    best = None
    for folder in glob.glob(os.path.join(glob.escape(root), "*", "")):
        folder = os.path.dirname(folder)
        last, args_path = os.path.join(folder, "last.pytar"), os.path.join(folder, "args.json")
        if os.path.lexists(last):
            state = read_state(folder)
            args, stamp = (state.get("args") if isinstance(state, dict) else None), last
        else:
            args, stamp = read_json(args_path), args_path
        if not isinstance(args, dict) or identity_diff(args, settings):
            continue
        try:
            mtime = os.path.getmtime(stamp)
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, folder)
    return best[1] if best else None


def is_committed(folder):
    """Whether a run folder holds a commit (last.pytar), intact or not."""
    return os.path.lexists(os.path.join(folder, "last.pytar"))


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
