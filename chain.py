#!/usr/bin/env python
"""Run the original's whole method with one command: a label-refinery chain of stages.

    python chain.py --data_dir D                       # B3 -> B3 (refined) -> B0 (refined) -> ex (refined)
    torchrun --standalone --nproc_per_node 8 chain.py --data_dir D

Stage 1 trains on hard labels; each later stage is refined by the previous stage's model_best.pytar.
Running the same command again skips finished stages and resumes an unfinished one. At the end the
final model is evaluated (as test.py does) and counted (as torchscope/count.py does), and
{save}/chain_report.md, chain_report.json and chain_curves.png are written.
"""
import argparse
import json
import os
import sys
import time

import torch

import data
import models
import train as train_stage
from engine import checkpoint, distributed, runs
from engine.cli import add_data_args, positive_float, positive_int, str2bool
from engine.errors import UserError, run_main
from engine.evaluate import evaluate_checkpoint
from engine.regime import default_regime, regime_end
from torchscope import count as count_model

DEFAULT_STAGES = "efficientnet_b3,efficientnet_b3,efficientnet_b0,efficientnet_ex"
STATE_FILE = "chain_state.json"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", default=DEFAULT_STAGES,
                   help="comma-separated models; each stage is refined by the one before it")
    add_data_args(p)
    p.add_argument("--save", default="checkpoints/chain", help="root of the chain's run folders")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs of every stage (default: each model's own regime)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"))
    p.add_argument("--aug", default="seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=positive_int, default=None)
    p.add_argument("--width-mult", type=positive_float, default=None,
                   help="override every stage's width (quick runs)")
    p.add_argument("--depth-mult", type=positive_float, default=None)
    p.add_argument("--s", type=positive_float, default=5.0)
    p.add_argument("--coslinear", type=str2bool, default=True, metavar="true|false")
    p.add_argument("--refinery-bn", choices=("eval", "train"), default="eval")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.stage_list = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stage_list if s not in models.MODELS]
    if not args.stage_list or unknown:
        parser.error(f"argument --stages: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                     f"known models: {', '.join(models.names())}")
    if args.aug not in data.AUG_RECIPES:
        parser.error(f"argument --aug: unknown recipe {args.aug!r}; use one of {', '.join(data.AUG_RECIPES)}")
    return args


def stage_argv(args, i, teacher):
    """train.py's command line for stage i (teacher: (model, checkpoint) of stage i-1 or None)."""
    model = args.stage_list[i]
    argv = ["--model", model, "--data_dir", args.data_dir, "--save", args.save,
            "--batch-size", str(args.batch_size), "--device", args.device, "--aug", args.aug,
            "--seed", str(args.seed), "--s", str(args.s), "--coslinear", str(args.coslinear).lower(),
            "--refinery-bn", args.refinery_bn]
    for flag, value in (("--epochs", args.epochs), ("--amp", args.amp),
                        ("--train-limit", args.train_limit), ("--test-limit", args.test_limit),
                        ("--width-mult", args.width_mult), ("--depth-mult", args.depth_mult),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None:
            argv += [flag, str(value)]
    if args.compile is not None:
        argv.append("--compile" if args.compile else "--no-compile")
    for flag, on in (("--no-download", args.no_download), ("--no-progress", args.no_progress)):
        if on:
            argv.append(flag)
    if teacher:
        argv += ["--label-refinery-model", teacher[0], "--label-refinery-state-file", teacher[1]]
        for flag, value in (("--label-refinery-width-mult", args.width_mult),
                            ("--label-refinery-depth-mult", args.depth_mult)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--label-refinery-coslinear", str(args.coslinear).lower()]
    return argv


def load_state(path, stage_list):
    state = runs.read_json(path) or {}
    if state.get("stages_spec") not in (None, stage_list):
        raise UserError(f"{path} belongs to a chain of stages {','.join(state['stages_spec'])}; use "
                        "another --save folder for a different chain")
    return state


def stage_cost(args, i):
    """Relative cost per sample of stage i: ~3 forwards for the student's step, 1 for the teacher."""
    def madds(name):
        m = models.create(name, coslinear=args.coslinear, width_mult=args.width_mult,
                          depth_mult=args.depth_mult)
        return count_model(m, mul_factor=1.0).madds(1.0)
    student = madds(args.stage_list[i])
    teacher = madds(args.stage_list[i - 1]) if i > 0 else 0.0
    return 3.0 * student + teacher


def stage_epochs(args, name):
    return args.epochs or regime_end(default_regime(name))


def main(argv=None):
    args = parse_args(argv)
    owns_group = not torch.distributed.is_initialized()
    ctx = distributed.setup(args.device)
    try:
        return chain(args, ctx)
    finally:
        if owns_group:
            distributed.teardown()


def chain(args, ctx):
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main:
        runs.check_save_root(args.save)
    state_path = os.path.join(args.save, STATE_FILE)
    state = load_state(state_path, args.stage_list)
    stages = state.get("stages", [])
    costs = [stage_cost(args, i) for i in range(len(args.stage_list))]
    eta_shown = False  # the ETA comes once, from the first epoch this command trains
    t_start = time.perf_counter()
    teacher = None
    for i, name in enumerate(args.stage_list):
        record = stages[i] if i < len(stages) else None
        base_argv = stage_argv(args, i, teacher)
        if record and record.get("argv") != base_argv:
            raise UserError(f"stage {i + 1} ({name}) in {state_path} ran with other settings; use another "
                            "--save folder or the same flags as before")
        if record and record.get("finished"):
            say(f"[chain] stage {i + 1}/{len(args.stage_list)} {name}: finished before "
                f"(best top-1 {record['best_top1']:.2f}%), skipped")
            teacher = (name, record["checkpoint"])
            continue
        # --resume auto finds this stage's unfinished run (its flags name the model and the teacher
        # file) even when a kill came before the chain could record it; otherwise it starts one.
        argv = base_argv + ["--resume", "auto"]
        say(f"[chain] stage {i + 1}/{len(args.stage_list)} {name}"
            + (f" refined by {teacher[0]} ({teacher[1]})" if teacher else " on hard labels"))

        def on_epoch(row, i=i):
            nonlocal eta_shown
            if not eta_shown and ctx.is_main:
                # ETA from the measured speed: seconds per unit of (samples x cost).
                per_epoch = row["images_per_s"] * row["seconds"]
                unit = row["seconds"] / (per_epoch * costs[i])
                left = sum(per_epoch * stage_epochs(args, n) * costs[j]
                           for j, n in enumerate(args.stage_list) if j >= i) * unit - row["seconds"]
                eta_shown = True
                say(f"[chain] ETA for the whole chain: {left / 60:.1f} min at the first epoch's "
                    f"speed ({row['images_per_s']:.0f} img/s)")

        result = train_stage.run(argv, on_epoch=on_epoch)
        entry = {"model": name, "teacher": teacher[0] if teacher else None,
                 "teacher_checkpoint": teacher[1] if teacher else None, "folder": result["folder"],
                 "checkpoint": os.path.join(result["folder"], "model_best.pytar"),
                 "argv": base_argv, "finished": not result["stopped"],
                 "epochs": len(result["history"]),
                 "best_top1": result["best"]["top1"] if result["best"] else None,
                 "seconds": sum(r["seconds"] for r in result["history"])}
        stages = stages[:i] + [entry]
        if ctx.is_main:
            runs.write_text_atomic(state_path, json.dumps(
                {"stages_spec": args.stage_list, "stages": stages}, indent=2) + "\n")
        if result["stopped"]:
            say("[chain] stopped; run the same command again to continue")
            return result["exit_code"]
        teacher = (name, entry["checkpoint"])
    # Every rank evaluates its shard of the test set (the metrics are all-reduced); rank 0 reports.
    final = final_evaluation(args, ctx, stages[-1])
    if ctx.is_main:
        report(args, stages, final)
    say(f"[chain] done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


def final_evaluation(args, ctx, last):
    """Hard-label test accuracy of the final model_best.pytar (test.py's figures) and its count."""
    r, net, _ = evaluate_checkpoint(
        last["model"], last["checkpoint"], args.data_dir, ctx.device, coslinear=args.coslinear,
        width_mult=args.width_mult, depth_mult=args.depth_mult, s=args.s, amp=args.amp,
        test_limit=args.test_limit, rank=ctx.rank, world_size=ctx.world_size)
    # The seed's conventions (SPEC §4/§5), as torchscope/count.py prints them by default.
    counted = count_model(net.cpu().float().to(memory_format=torch.contiguous_format), mul_factor=0.5)
    scores = counted.scores()
    return {"top1": r["top1"], "top5": r["top5"], "correct": r["correct"], "total": r["total"],
            "params": counted.total_params, "madds": counted.madds(0.5), "madds_mf1": counted.madds(1.0),
            "score": scores["freebie"]["score"], "score_full": scores["full"]["score"],
            "reached_80": r["reached_80"]}


def report(args, stages, final):
    doc = {"stages": [{k: s[k] for k in ("model", "teacher", "teacher_checkpoint", "checkpoint",
                                         "epochs", "best_top1", "seconds")} for s in stages],
           "final": final}
    runs.write_text_atomic(os.path.join(args.save, "chain_report.json"), json.dumps(doc, indent=2) + "\n")
    lines = ["# Label-refinery chain report", "",
             "| stage | model | teacher | epochs | best top-1 | minutes | checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(doc["stages"], 1):
        lines.append(f"| {i} | {s['model']} | {s['teacher'] or '(hard labels)'} | {s['epochs']} | "
                     f"{s['best_top1']:.2f}% | {s['seconds'] / 60:.1f} | `{s['checkpoint']}` |")
    f = final
    lines += ["", f"## Final model: {stages[-1]['model']}", "",
              f"- test top-1 {f['top1']:.2f}% ({f['correct']}/{f['total']}), top-5 {f['top5']:.2f}%",
              f"- parameters {f['params']:,}; mult-adds {f['madds']:,.0f} (mul_factor 0.5), "
              f"{f['madds_mf1']:,.0f} (mul_factor 1)",
              f"- MicroNet score {f['score']:.6f} (16-bit freebie), {f['score_full']:.5f} (no freebie)",
              f"- 80% bar: {'reached' if f['reached_80'] else 'not reached'}"]
    runs.write_text_atomic(os.path.join(args.save, "chain_report.md"), "\n".join(lines) + "\n")
    draw_chain_curves(os.path.join(args.save, "chain_curves.png"), stages)
    print("\n".join(lines))


def draw_chain_curves(path, stages):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(stages, 1):
        hist = []
        last = os.path.join(s["folder"], "last.pytar")
        if os.path.exists(last):
            hist = checkpoint.load_file(last).get("history", [])
        ax.plot([r["epoch"] for r in hist], [r["test_top1"] for r in hist],
                label=f"{i}: {s['model']}{' (refined)' if s['teacher'] else ''}")
    ax.set_xlabel("epoch"), ax.set_ylabel("test top-1 (%)"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_main(main))
