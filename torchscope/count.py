"""Print parameters, FLOPs, Madds, memory and the MicroNet score of a model (see --help).

    python torchscope/count.py                        # efficientnet_ex, uci rules, mul_factor 0.5
    python torchscope/count.py --mul-factor 1
    python torchscope/count.py --rules micronet --model-state-file model_state_ex.pytar
    python -m torchscope.count --per-layer            # the same, as a module

A script, not a module to import: `import torchscope.count` would replace the function
`torchscope.count` with this module (`python -m` runs it without that import). The code lives in
torchscope/command.py; the project's packages come from its installation (`pip install -e .`).
"""
import importlib.util
import sys

# The project's top-level packages and modules (pyproject.toml).
PROJECT = {"models", "loss", "data", "refinery", "engine", "torchscope", "compress", "deploy", "micronet_cifar100"}


def _entry():
    try:
        from torchscope.command import script
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or importlib.util.find_spec(top) is not None:
            raise  # the package is there and a module inside it is missing: a bug, not a setup step
        if top in PROJECT:
            what, fix = f"the project (its package {top!r})", "pip install -e ."
        else:
            what, fix = f"the package {top!r}", "pip install -r requirements.txt"
        print(f"error: {what} is not installed; run `{fix}` from the repository root", file=sys.stderr)
        return 2
    return script()


if __name__ == "__main__":
    sys.exit(_entry())
