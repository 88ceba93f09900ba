"""Progress inside an epoch: a tqdm bar on a terminal; elsewhere (a log file, a batch job) a line
every `interval` steps or every `min_seconds`, whichever comes later.

The meter is read (a host synchronisation) only when something is shown, at most once per
`interval` steps, so a GPU step never waits for it.
"""
import sys
import time


def format_duration(seconds):
    """3725 -> '1h02m', 125 -> '2m05s', 42 -> '42s'; days for long runs."""
    seconds = max(0, int(round(seconds)))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    def __init__(self, log, total, first_step, desc, interval, enabled=True, tty=None, min_seconds=60.0):
        self.log, self.total, self.desc, self.interval = log, total, desc, interval
        self.enabled = enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.min_seconds = min_seconds
        self.first_step = first_step
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=first_step, desc=desc, dynamic_ncols=True, leave=False,
                            unit="batch")
            log.bar_active = True

    def rates(self, step, summary):
        """(steps/s, images/s) since this epoch's first step in this process; images per step are
        the epoch's average (this rank's)."""
        steps_s = (step - self.first_step) / max(time.perf_counter() - self.t0, 1e-9)
        return steps_s, steps_s * summary["total"] / max(step, 1)

    def update(self, step, meter):
        """After `step` steps of the epoch (1-based count)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.interval == 0:
                s = meter.summary()
                self.bar.set_postfix(loss=f"{s['loss']:.3f}", top1=f"{s['top1']:.1f}%",
                                     img_s=f"{self.rates(step, s)[1]:.0f}")
            return
        now = time.perf_counter()
        if step % self.interval == 0 and now - self.last_line >= self.min_seconds and step < self.total:
            self.last_line = now
            s = meter.summary()
            steps_s, images_s = self.rates(step, s)
            self.log(f"  {self.desc} step {step}/{self.total} | loss {s['loss']:.4f} top-1 {s['top1']:.2f}% | "
                     f"{images_s:.0f} img/s | epoch ETA {format_duration((self.total - step) / steps_s)}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.log.bar_active = False
