"""Print parameters, FLOPs, Madds, memory and the MicroNet score of a model (see --help).

    python torchscope/count.py                        # efficientnet_ex, seed rules, mul_factor 0.5
    python torchscope/count.py --mul-factor 1
    python torchscope/count.py --rules micronet --model-state-file model_state_ex.pytar

A script, not a module to import: `import torchscope.count` would replace the function
`torchscope.count` with this module. The code lives in torchscope/cli.py.
"""
import os
import sys

if __name__ == "__main__":
    # Run as a script, its folder (torchscope/) heads sys.path; the repo root must take its place
    # so that `models`, `engine` and the `torchscope` package import as they do everywhere else.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

    from torchscope.cli import script

    sys.exit(script())
