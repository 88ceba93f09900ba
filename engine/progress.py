"""Progress inside an epoch: a tqdm bar on a terminal; elsewhere (a log file, a batch job) a line
every `interval` steps or every LINE_SECONDS, whichever comes later. Once ETA_AFTER seconds of steps
have passed (after the warm-up steps, which include compiling), the measured speed is handed to
`on_rate` once, for the early ETA of the epoch, the run and the chain.

The meter is read (a host synchronisation) only when something is shown, at most once per
`interval` steps, so a GPU step never waits for it. The clock is the host's: on a GPU the host runs
ahead of the device only by the launch queue, which is small next to ETA_AFTER.
"""
import sys
import time

LINE_SECONDS = 60.0
ETA_AFTER = 30.0


DAY_S = 86400


def format_duration(seconds):
    """3725 -> '1h02m', 125 -> '2m05s', 42 -> '42s'; days for long runs."""
    seconds = max(0, int(round(seconds)))
    d, rem = divmod(seconds, DAY_S)
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
    def __init__(self, log, total, first_step, desc, interval, enabled=True, on_rate=None, warmup=0):
        self.log, self.total, self.desc, self.interval = log, total, desc, interval
        self.enabled, self.on_rate, self.warmup = enabled, on_rate, warmup
        self.first_step = first_step
        self.t0 = self.last_line = time.perf_counter()
        # The speed clock: (time, step) once the warm-up steps are done.
        self.clock = (self.t0, first_step) if warmup == 0 else None
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=first_step, desc=desc, dynamic_ncols=True, leave=False,
                            unit="batch")
            log.bar_active = True

    def steps_per_s(self, step, now):
        if self.clock is None or step <= self.clock[1]:
            return None
        return (step - self.clock[1]) / max(now - self.clock[0], 1e-9)

    def update(self, step, meter):
        """After `step` steps of the epoch (1-based count)."""
        now = time.perf_counter()
        if self.clock is None and step - self.first_step >= self.warmup:
            self.clock = (now, step)
        if self.on_rate is not None and self.clock is not None and now - self.clock[0] >= ETA_AFTER:
            on_rate, self.on_rate = self.on_rate, None
            on_rate(self.steps_per_s(step, now), step)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.interval == 0:
                s = meter.summary()
                self.bar.set_postfix(loss=f"{s['loss']:.3f}", top1=f"{s['top1']:.1f}%")
            return
        rate = self.steps_per_s(step, now)
        if step % self.interval == 0 and now - self.last_line >= LINE_SECONDS and step < self.total and rate:
            self.last_line = now
            s = meter.summary()
            self.log(f"  {self.desc} step {step}/{self.total} | loss {s['loss']:.4f} top-1 {s['top1']:.2f}% | "
                     f"{rate * s['total'] / max(step, 1):.0f} img/s | epoch ETA "
                     f"{format_duration((self.total - step) / rate)}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.log.bar_active = False
