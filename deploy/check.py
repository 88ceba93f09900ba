"""Evidence that a deployment computes what was scored: outputs on the test set, side by side.

    ref = deploy.check.test_py_outputs(model, images)      # the checkpoint's outputs, as test.py computes them
    deploy.check.agreement(ref, other)                     # predictions compared, near-ties apart
"""
import torch

import data

# Two classes whose outputs are closer than this are a tie: float rounding alone can order them
# either way (the bound for a dense model).
TIE = 1e-5


def test_images(data_dir, limit=None, download=False, memory_format=torch.channels_last):
    """(normalised test images [N, 3, 32, 32] in `memory_format`, labels), as test.py evaluates them."""
    images, labels = data.load_cifar100(data_dir, train=False, download=download)
    images, labels = data.subset(images, labels, limit)
    loader = data.EvalLoader(images, labels, len(labels), place=data.Placement(memory_format=memory_format))
    (x, y), = list(loader)
    return x, y


@torch.inference_mode()
def outputs(model, images, batch_size=1000):
    """`model`'s outputs on `images` in eval mode, batch by batch (test.py's default batch), in
    the images' memory format: the CPU numerics test.py gives."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    finally:
        model.train(was)


def top2_gap(out):
    top = out.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def agreement(reference, other, labels=None, tie=TIE):
    """Predictions (argmax) of two output tensors compared: {"images", "agree", "disagree",
    "disagree_ties": disagreements where the reference's top two are within `tie`, "max_abs_diff",
    "correct_reference", "correct_other"}."""
    other = torch.as_tensor(other, dtype=torch.float32)
    reference = reference.float()
    pr, po = reference.argmax(1), other.argmax(1)
    differ = pr != po
    gap = top2_gap(reference)
    out = {"images": len(pr), "agree": int((~differ).sum()), "disagree": int(differ.sum()),
           "disagree_ties": int((differ & (gap < tie)).sum()),
           "max_abs_diff": float((reference - other).abs().max()) if len(pr) else 0.0,
           "disagreeing_images": differ.nonzero().flatten().tolist()[:50]}
    if labels is not None:
        out["correct_reference"] = int((pr == labels).sum())
        out["correct_other"] = int((po == labels).sum())
    return out
