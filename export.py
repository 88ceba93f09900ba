#!/usr/bin/env python
"""Deploy a checkpoint: an ONNX file for ONNX Runtime, and a packed file of exactly what the MicroNet
score counts (docs/deploying.md).

    python export.py --model efficientnet_ex --model-state-file RUN/model_best.pytar --onnx ex.onnx
    python export.py --model-state-file RUN/model_best.pytar --packed ex.bin     # the model from the file
    python export.py --model-state-file RUN/model_best.pytar --onnx ex.onnx --packed ex.bin --verify --data_dir D

Dense, pruned and quantised checkpoints (their compression record) of every registered model.
BatchNorm is folded into the convs and the masks are applied; quantised layers keep their integers,
scales and zero points. --verify compares the predictions of ONNX Runtime and of the packed file
with test.py's on the test set. `--onnx` needs `pip install -e .[export]`.
"""
import argparse
import json
import os
import sys

import torch

import compress
import deploy
import models
import torchscope
from deploy import check
from engine import checkpoint, distributed
from engine.evaluate import evaluate_checkpoint
from micronet_cifar100 import errors
from micronet_cifar100.cli.args import add_data_args, add_model_args, parse_for_checkpoint, positive_int
from micronet_cifar100.cli.errors import run_main
from torchscope.mtas import mtas

# The random batch the exported files are first compared on (the test set needs --verify).
PROBE = 8


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--model-state-file", required=True, help="checkpoint to deploy (dense, pruned or quantised)")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx",
                   help="write the model as ONNX (QDQ for quantised layers)")
    p.add_argument("--packed", default=None, metavar="OUT.bin",
                   help="write exactly what the score counts: weights at their bits, masks, biases, scales")
    p.add_argument("--verify", action="store_true",
                   help="compare the predictions of the files written (ONNX Runtime's, the packed file's read "
                        "back) with test.py's on the test set")
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int, default=1000,
                   help="test.py's batch size, for --verify")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON")
    return p


def parse_args(argv):
    """export.py's flags; the architecture comes from the checkpoint unless the flags say it (as test.py)."""
    return parse_for_checkpoint(build_parser(), argv, check=check_outputs)


def check_outputs(parser, args):
    if not (args.onnx or args.packed):
        parser.error("nothing to write: give --onnx OUT.onnx, --packed OUT.bin or both")
    for flag, path in (("--onnx", args.onnx), ("--packed", args.packed)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"argument {flag}: folder {folder} does not exist")


def load(args):
    """The checkpoint's model (its record applied, as test.py evaluates it) and its record."""
    model = models.create(args.model, head=models.head_name(args.coslinear), width_mult=args.width_mult,
                          depth_mult=args.depth_mult)
    meta = checkpoint.load_weights(model, args.model_state_file)
    return model.eval(), meta.get("compression")


def probe(a, b):
    """(max |difference|, bit for bit equal?) of two models' outputs on PROBE random images."""
    x = torch.randn((PROBE, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x).float(), torch.as_tensor(b(x)).float()
    return float((ya - yb).abs().max()), torch.equal(ya, yb)


def probe_diff(a, b):
    return probe(a, b)[0]


def write_packed(args, graph, net, model, record, out):
    info = deploy.packed.write(graph, args.packed)
    charged = torchscope.count(model, rules="micronet", compression=record).params32 * 32
    body = info["body_bits"]
    reloaded = deploy.DeployedNet(deploy.packed.read(args.packed))
    exact = probe(net, reloaded)[1]
    out["packed"] = {**info, "path": args.packed, "count_params_bits": charged,
                     "body_vs_count": body / charged if charged else None, "reload_exact": exact}
    print(f"packed: wrote {args.packed}, {info['bytes']:,} bytes = header {info['header_bytes']:,} + body "
          f"{body:,} bits (padded to {info['body_bytes']:,} bytes)")
    print(f"  count.py --rules micronet charges {charged:,.0f} parameter bits; body / charged = "
          f"{body / charged:.6f}" if charged else "  count.py charges no parameter bits")
    print(f"  read back: {'outputs equal the deployed graph bit for bit' if exact else 'OUTPUTS DIFFER'}")
    return reloaded


def write_onnx(args, graph, net, out):
    from deploy import onnx_export, runtime
    onnx_export.export(graph, args.onnx)
    sess = runtime.session(args.onnx)
    diff = probe_diff(net, lambda x: runtime.run(sess, x))
    k = runtime.kernels(args.onnx)
    names = [op.name for op in graph.ops if op.kind == "layer"]
    widths = {L.name: f"W{L.weight_bits}/A{L.act_bits}" for L in graph.layers()}
    fused = {}
    for op_type, nodes in k["integer"].items():
        for n in nodes:
            layer = runtime.layer_of(n, names)
            fused.setdefault(op_type, []).append({"node": n, "layer": layer, "bits": widths.get(layer)})
    out["onnx"] = {"path": args.onnx, "bytes": os.path.getsize(args.onnx), "probe_max_abs_diff": diff,
                   "onnxruntime": k["version"], "integer_kernels": fused, "float_layer_ops": k["float_layers"]}
    print(f"onnx: wrote {args.onnx} ({os.path.getsize(args.onnx):,} bytes); ONNX Runtime {k['version']} on "
          f"{PROBE} random images: max |difference| {diff:.2e} from the deployed graph in PyTorch")
    if fused:
        parts = []
        for op_type, items in sorted(fused.items()):
            bits = sorted({i["bits"] for i in items if i["bits"]})
            parts.append(f"{op_type} x{len(items)} ({', '.join(bits) or 'unnamed'})")
        print(f"  integer kernels: {'; '.join(parts)}")
    else:
        print("  integer kernels: none (every layer runs in float" +
              (" after DequantizeLinear)" if any(L.weight_bits in compress.INT_BITS for L in graph.layers()) else ")"))
    floats = sum(len(v) for v in k["float_layers"].values())
    print(f"  layers in float kernels: {floats}")
    return sess


def verify(args, reloaded, sess, out):
    from deploy import runtime
    ctx = distributed.Context(device=torch.device("cpu"))
    cfg = argparse.Namespace(**vars(args), s=5.0, amp=None)
    result, test_model, _ = evaluate_checkpoint(cfg, args.model_state_file, ctx)
    x, y = check.test_images(args.data_dir, args.test_limit, download=not args.no_download)
    ref = check.outputs(test_model, x, args.eval_batch_size)
    if int((ref.argmax(1) == y).sum()) != result["correct"]:
        raise RuntimeError("the reference outputs do not reproduce test.py's correct count")
    out["verify"] = {"images": len(y), "test_py_correct": result["correct"]}
    # What was written is what is compared. The packed file read back computes the deployed graph
    # bit for bit (checked above), so its figures are the folded graph's too.
    compared = []
    if reloaded is not None:
        compared.append(("the packed file read back (the deployed graph in PyTorch)", "packed",
                         check.outputs(reloaded, x)))
    if sess is not None:
        compared.append(("ONNX Runtime", "onnxruntime", torch.from_numpy(runtime.run(sess, x.contiguous()))))
    print(f"verify: test.py's predictions on {len(y):,} test images ({result['correct']:,} correct) against")
    for words, key, o in compared:
        a = check.agreement(ref, o, y)
        out["verify"][key] = a
        print(f"  {words}: {a['agree']:,} agree, {a['disagree']:,} differ ({a['disagree_ties']} of them "
              f"ties within {check.TIE:g}); {a['correct_other']:,} correct; max |difference| {a['max_abs_diff']:.2e}")


def main(argv=None):
    args = parse_args(argv)
    model, record = load(args)
    arch = models.describe(model)
    graph = deploy.fold(model, record, arch=arch)
    net = deploy.DeployedNet(graph)
    d = deploy.describe(graph)
    out = {"model": arch, "checkpoint": args.model_state_file,
           "compression": compress.summary(record) if record else None, "graph": d}
    print(f"{models.label(arch)} {args.model_state_file}" + (f"; {out['compression']}" if record else "; dense"))
    print(f"deployed graph: {d['layers']} layers ({d['widths']}), {d['folded']} BatchNorms folded, "
          f"{d['sparse']} layers stored sparse; max |difference| from the checkpoint on {PROBE} random "
          f"images {probe_diff(model, net):.2e}")
    m = mtas(model, compression=record)
    out["mtas_bits"] = m.total_bits
    print(f"MTAS: {m.total_bits:,} bits ({m.total_bits / 8 / 1024:,.1f} KiB) of activations alive at {m.peak}")
    reloaded = write_packed(args, graph, net, model, record, out) if args.packed else None
    sess = write_onnx(args, graph, net, out) if args.onnx else None
    if args.verify:
        verify(args, reloaded, sess, out)
    failed = reloaded is not None and not out["packed"]["reload_exact"]
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2, default=str)
        except OSError as e:
            raise errors.ConfigError(f"cannot write {args.json}: {e.strerror or e}", setting="json") from None
    if failed:
        print(f"error: {args.packed} read back does not give the deployed graph's outputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
