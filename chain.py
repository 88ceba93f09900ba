#!/usr/bin/env python
"""Run the original entry's whole method with one command: a label-refinery chain of stages.

    python chain.py --data_dir D                       # B3 -> B3 (refined) -> B0 (refined) -> ex (refined)
    torchrun --standalone --nproc_per_node 8 chain.py --data_dir D

Stage 1 trains on hard labels; each later stage is refined by the previous stage's model_best.pytar.
Every train.py flag applies to every stage (the model and teacher of each come from --stages).
With --prune and/or --quant a final compression stage follows: the last model, initialised from its
own best weights and refined by them, pruned and quantised over --compress-epochs:

    python chain.py --data_dir D --prune 0.5 --quant 8 8          # ... -> ex -> ex (compressed)

Running the same command again skips finished stages and resumes an unfinished one. At the end the
final model is evaluated (as test.py does) and counted (as torchscope/count.py does), and
{save}/chain_report.md, chain_report.json and chain_curves.png are written.
"""
import dataclasses
import os
import sys
import time

import torch

import compress
import data
from micronet_cifar100 import errors
import models
from micronet_cifar100.cli.args import positive_int
from micronet_cifar100.cli.errors import run_main
from micronet_cifar100.cli.train_flags import build_parser as train_flags, finish_args
from engine import checkpoint, distributed, optim, run_folder
from engine.config import RunConfig
from engine.evaluate import evaluate_checkpoint
from engine.progress import DAY_S, format_duration
from engine.trainer import Hooks, Trainer
from torchscope import count as count_model

DEFAULT_STAGES = ",".join(models.UCI_CHAIN)
STATE_FILE = "chain_state.json"
# What chain.py decides for every stage: the user cannot give these.
STAGE_SETTINGS = ("model", "lr_regime", "label_refinery_model", "label_refinery_state_file",
                  "label_refinery_width_mult", "label_refinery_depth_mult", "label_refinery_coslinear",
                  "resume", "init_from")
COMPRESSION_SETTINGS = ("prune", "prune_schedule", "prune_scope", "prune_exclude", "prune_max_sparsity", "quant",
                        "quant_first_last", "quant_method", "qat_freeze_observers", "qat_freeze_bn")


def chain(cfg, ctx):
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main:
        run_folder.check_save_root(cfg.save)
        run_folder.remove_leftovers(cfg.save)
    state_path = os.path.join(cfg.save, STATE_FILE)
    before = load_stages(state_path, cfg.stage_spec)
    eta = ChainEta(cfg, say)
    t_start = time.perf_counter()
    teacher, done = None, []

    def record(stages):
        if ctx.is_main:
            with run_folder.root_writes(cfg.save):
                run_folder.write_json(state_path, {"stages_spec": cfg.stage_spec, "stages": stages})

    for i, name in enumerate(cfg.stage_list):
        known = before[i] if i < len(before) else None
        folder = known.get("folder") if known and not known.get("finished") else None
        if folder and not os.path.isdir(folder):
            say(f"[chain] stage {i + 1}: its run folder {folder} is gone; the stage starts again")
            folder = None
        stage = stage_config(cfg, i, teacher, folder)
        check_stage(known, stage, i, state_path)
        if stage.init_from:
            name += " (compressed)"
        if known and known.get("finished"):
            say(f"[chain] stage {i + 1}/{len(cfg.stage_list)} {name}: finished before "
                f"(best top-1 {known['best_top1']:.2f}%), skipped")
        else:
            # The stage's folder is recorded as soon as its run opens it, before any training: a rerun
            # continues there, or starts over there when no epoch was committed. A folder opened
            # but not recorded (a kill in between) is the newest of these arguments, which
            # --resume auto continues, or adopts when it finished.
            say(f"[chain] stage {i + 1}/{len(cfg.stage_list)} {name}"
                + (f" refined by {teacher[0]} ({teacher[1]})" if teacher else " on hard labels"))
            hooks = Hooks(on_speed=lambda ips, left, i=i: eta.on_speed(i, ips, left),
                          on_folder=lambda opened, stage=stage, teacher=teacher:
                          record(done + [stage_result(stage, teacher, opened)]))
            result = Trainer(stage, ctx, hooks).fit()
            known = stage_result(stage, teacher, result["folder"], result)
            record(done + [known])
            if result["stopped"]:
                say("[chain] stopped; run the same command again to continue")
                return result["exit_code"]
        done.append(known)
        teacher = (stage.model, known["checkpoint"])
    # Every rank evaluates its shard of the test set (the metrics are all-reduced); rank 0 reports.
    final = final_evaluation(stage, ctx, done[-1])
    if ctx.is_main:
        with run_folder.root_writes(cfg.save):
            report(cfg, done, final)
    say(f"[chain] done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


def stage_config(cfg, i, teacher, folder=None):
    """Stage i's RunConfig: the chain's settings, its model, the previous stage as its teacher, and
    --resume with the stage's recorded run folder (`folder`), or auto when it has none yet. Every
    setting counts as given, so a resume must match all of them."""
    model = cfg.stage_list[i]
    stage = dict(vars(cfg), model=model, lr_regime=cfg.lr_regime or optim.format_regime(models.card(model).lr_regime),
                 label_refinery_model=teacher[0] if teacher else None,
                 label_refinery_state_file=teacher[1] if teacher else None,
                 label_refinery_width_mult=cfg.width_mult if teacher else None,
                 label_refinery_depth_mult=cfg.depth_mult if teacher else None,
                 label_refinery_coslinear=cfg.coslinear, init_from=None, resume=folder or "auto")
    if cfg.compress_final and i == len(cfg.stage_list) - 1:
        # The final stage compresses the stage before it: its weights to start from, and its teacher.
        stage.update(init_from=teacher[1], epochs=cfg.compress_epochs, lr_regime=cfg.compress_lr_regime
                     or optim.format_regime(optim.fine_tune_regime(cfg.compress_epochs)))
    else:
        stage.update(dict.fromkeys(COMPRESSION_SETTINGS))
    settings = RunConfig.from_mapping(stage, argv=tuple(cfg.argv), script="chain.py")
    return dataclasses.replace(settings, given=tuple(settings.settings()))


def stage_result(stage, teacher, folder, result=None):
    """What chain_state.json keeps of a stage: its run folder from the moment the run opens it
    (`result` None: not finished), then what the run gave."""
    history, best = (result["history"], result["best"]) if result else ([], None)
    return {"model": stage.model, "compressed": bool(stage.init_from), "teacher": teacher[0] if teacher else None,
            "teacher_checkpoint": teacher[1] if teacher else None, "folder": folder,
            "checkpoint": os.path.join(folder, "model_best.pytar") if folder else None,
            "identity": stage.identity(), "finished": bool(result) and not result["stopped"],
            "epochs": len(history), "best_top1": best["top1"] if best else None,
            "seconds": sum(r["seconds"] for r in history)}


def load_stages(path, stage_spec):
    """The stages chain_state.json holds. A chain may grow (a compression stage added to a finished
    chain): the stages it holds must be the first of this one's."""
    state = run_folder.read_json(path) or {}
    spec = state.get("stages_spec")
    if spec is not None and spec != stage_spec[:len(spec)]:
        raise errors.RunError(f"{path} belongs to a chain of stages {','.join(spec)}; use "
                              "another --save folder for a different chain")
    return state.get("stages", [])


def check_stage(known, stage, i, path):
    """A stage run before must have been run with this stage's settings; the refusal names the chain
    flags the user controls, with their values as typed."""
    if not known:
        return
    before = known.get("identity", {})
    diff = [k for k, v in stage.identity().items() if before.get(k) != v]
    if diff:
        changes = []
        for k in diff:
            change = f"{chain_flag(k, stage)} {as_typed(getattr(stage, k))} (before: {as_typed(before.get(k))})"
            if change not in changes:
                changes.append(change)
        raise errors.RunError(f"stage {i + 1} ({stage.model}) in {path} ran with other settings: "
                              f"{', '.join(changes[:4])}; use the same flags as before or another --save folder")


# Stage settings chain.py derives, and the chain flag behind each (compression: the final stage's).
DERIVED = {"label_refinery_model": "--stages", "label_refinery_state_file": "the stage before it (its teacher)",
           "label_refinery_width_mult": "--width-mult", "label_refinery_depth_mult": "--depth-mult",
           "label_refinery_coslinear": "--coslinear", "init_from": "the stage before it (its weights)"}
COMPRESSION_DERIVED = {"lr_regime": "--compress-epochs/--compress-lr-regime (its LR regime)",
                       "epochs": "--compress-epochs"}


def chain_flag(setting, stage):
    """The chain flag (or the fact) behind a stage setting."""
    if stage.init_from and setting in COMPRESSION_DERIVED:
        return COMPRESSION_DERIVED[setting]
    return DERIVED.get(setting, "--" + setting.replace("_", "-"))


def as_typed(value):
    """A setting's value as a user types it: 8 8, 0.5, true, or (not given)."""
    if value is None:
        return "(not given)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(as_typed(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class ChainEta:
    """The whole chain's time left, from the speed the first stage this command trains measures
    (train.py's early ETA, after ~30 s of steps): the other stages' speeds are scaled by their cost
    per sample, one student step (~3 forwards) plus the teacher's forward, counted in mult-adds."""

    def __init__(self, cfg, say):
        self.cfg, self.say, self.shown = cfg, say, False
        self._madds = {}

    def madds(self, name):
        """Counted when the ETA is due, once per model (counting takes seconds for b3 on a CPU)."""
        if name not in self._madds:
            m = models.create(name, head=models.head_name(self.cfg.coslinear), width_mult=self.cfg.width_mult,
                              depth_mult=self.cfg.depth_mult)
            self._madds[name] = count_model(m, mul_factor=1.0).madds(1.0)
        return self._madds[name]

    def stage_cost(self, i):
        names = self.cfg.stage_list
        return 3.0 * self.madds(names[i]) + (self.madds(names[i - 1]) if i > 0 else 0.0)

    def epochs(self, j):
        if self.cfg.compress_final and j == len(self.cfg.stage_list) - 1:
            return self.cfg.compress_epochs
        return self.cfg.epochs or models.card(self.cfg.stage_list[j]).epochs

    def samples_per_epoch(self):
        return data.copies(self.cfg.aug) * (self.cfg.train_limit or data.TRAIN_IMAGES)

    def on_speed(self, i, images_per_s, stage_left_s):
        """Stage i measured `images_per_s` and has `stage_left_s` to go."""
        if self.shown:
            return
        self.shown = True
        later = sum(self.epochs(j) * self.samples_per_epoch() * self.stage_cost(j)
                    / (images_per_s * self.stage_cost(i))
                    for j in range(i + 1, len(self.cfg.stage_list)))
        left = stage_left_s + later
        self.say(f"[chain] ETA for the whole chain: {format_duration(left)} at the measured speed of stage "
                 f"{i + 1} ({images_per_s:.3g} img/s), scaled by each later model's cost")
        if not torch.cuda.is_available() and left > DAY_S:
            self.say("[chain] ETA: on this CPU the chain would take days; for a quick run give "
                     "--width-mult 0.25 --depth-mult 0.34 --train-limit 10000 --epochs 2, or use a GPU")


def final_evaluation(stage, ctx, last):
    """Hard-label test accuracy of the final model_best.pytar (test.py's figures) and its count."""
    r, net, meta = evaluate_checkpoint(dataclasses.replace(stage, model=last["model"]), last["checkpoint"], ctx)
    net = net.cpu().float().to(memory_format=torch.contiguous_format)
    # The original entry's counting conventions, as torchscope/count.py prints them by default.
    uci = count_model(net, mul_factor=0.5)
    final = {"top1": r["top1"], "top5": r["top5"], "correct": r["correct"], "total": r["total"],
             "params": uci.total_params, "madds": uci.madds(0.5), "madds_mf1": uci.madds(1.0),
             "reached_80": r["reached_80"]}
    counted = uci
    if meta.get("compression"):
        # The original's counting ignores compression: a compressed model is scored as the organisers
        # count it, with its bits and its masks.
        counted = count_model(net, rules="micronet", compression=meta["compression"])
        final["compression"] = compress.summary(meta["compression"])
    allowed = counted.score()
    final.update(score=allowed["score"], score_rules=counted.rules, score_rule=allowed["rule"],
                 score_full=counted.scores()["full"]["score"])
    return final


def report(cfg, stages, final):
    doc = {"stages": [{k: s.get(k) for k in ("model", "compressed", "teacher", "teacher_checkpoint", "checkpoint",
                                         "epochs", "best_top1", "seconds")} for s in stages],
           "final": final}
    run_folder.write_json(os.path.join(cfg.save, "chain_report.json"), doc)
    lines = ["# Label-refinery chain report", "",
             "| stage | model | teacher | epochs | best top-1 | minutes | checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(doc["stages"], 1):
        lines.append(f"| {i} | {s['model']}{' (compressed)' if s.get('compressed') else ''} | {s['teacher'] or '(hard labels)'} | {s['epochs']} | "
                     f"{s['best_top1']:.2f}% | {s['seconds'] / 60:.1f} | `{s['checkpoint']}` |")
    f = final
    lines += ["", f"## Final model: {stages[-1]['model']}", "",
              f"- test top-1 {f['top1']:.2f}% ({f['correct']}/{f['total']}), top-5 {f['top5']:.2f}%",
              f"- parameters {f['params']:,}; mult-adds {f['madds']:,.0f} (mul_factor 0.5), "
              f"{f['madds_mf1']:,.0f} (mul_factor 1)",
              f"- MicroNet score {f['score']:.6f} (--rules {f['score_rules']}; {f['score_rule']})"
              + (f"; {f['score_full']:.6f} without the freebie" if f["score_full"] != f["score"] else ""),
              f"- 80% bar: {'reached' if f['reached_80'] else 'not reached'}"]
    if "compression" in f:
        lines.insert(-2, f"- compressed: {f['compression']}")
    run_folder.write_text_atomic(os.path.join(cfg.save, "chain_report.md"), "\n".join(lines) + "\n")
    problem = draw_chain_curves(os.path.join(cfg.save, "chain_curves.png"), stages)
    if problem:
        print(f"warning: chain_curves.png not drawn ({problem})")
    print("\n".join(lines))


def draw_chain_curves(path, stages):
    """Test top-1 per epoch of every stage; returns the reason it could not draw, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    try:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, s in enumerate(stages, 1):
            hist = []
            last = os.path.join(s["folder"], "last.pytar")
            if os.path.exists(last):
                hist = checkpoint.load_file(last, mmap=True).get("history", [])
            ax.plot([r["epoch"] for r in hist], [r["test_top1"] for r in hist],
                    label=f"{i}: {s['model']}{' (refined)' if s['teacher'] else ''}")
        ax.set_xlabel("epoch"), ax.set_ylabel("test top-1 (%)"), ax.grid(alpha=0.3), ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
    except (OSError, errors.ToolkitError) as e:
        plt.close("all")
        return errors.first_line(e)
    return None


def build_parser():
    p = train_flags(stage_flags=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=DEFAULT_STAGES,
                   help="comma-separated models; each stage is refined by the one before it")
    p.add_argument("--compress-epochs", type=positive_int, default=optim.FINE_TUNE.epochs,
                   help="epochs of the final compression stage (with --prune and/or --quant)")
    p.add_argument("--compress-lr-regime", nargs="+", default=None, metavar="START END LR",
                   help="the compression stage's LR regime (default: 0.007 while pruning, then 0.0007 "
                        "and 0.00007)")
    p.set_defaults(save="checkpoints/chain")
    return p


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = finish_args(parser, parser.parse_args(argv), argv)
    cfg.stage_list = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    unknown = [s for s in cfg.stage_list if s not in models.names()]
    if not cfg.stage_list or unknown:
        parser.error(f"argument --stages: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                     f"known models: {', '.join(models.names())}")
    # A compression stage: the last model again, compressed (recorded as "MODEL+compressed").
    cfg.compress_final = bool(cfg.prune or cfg.quant)
    cfg.stage_spec = list(cfg.stage_list)
    if cfg.compress_final:
        cfg.stage_list.append(cfg.stage_list[-1])
        cfg.stage_spec.append(cfg.stage_list[-1] + "+compressed")
    if cfg.compress_lr_regime:
        try:
            cfg.compress_lr_regime = optim.format_regime(optim.parse_regime(cfg.compress_lr_regime))
        except errors.ToolkitError as e:
            parser.error(f"argument --compress-lr-regime: {e}")
    if cfg.prune_schedule and cfg.prune_schedule[1] > cfg.compress_epochs:
        parser.error(f"argument --prune-schedule: the span ends at epoch {cfg.prune_schedule[1]}, after the "
                     f"compression stage's last epoch {cfg.compress_epochs} (--compress-epochs)")
    if not cfg.compress_final and {"compress_epochs", "compress_lr_regime"} & set(cfg.given):
        parser.error("--compress-epochs and --compress-lr-regime set the compression stage, which --prune "
                     "SPARSITY and/or --quant W A add")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    owns_group = not torch.distributed.is_initialized()
    ctx = distributed.setup(cfg.device)
    try:
        return chain(cfg, ctx)
    finally:
        if owns_group:
            distributed.teardown()


if __name__ == "__main__":
    sys.exit(run_main(main))
