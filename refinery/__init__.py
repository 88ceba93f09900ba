"""Label refinery (arXiv 1805.02641): a frozen teacher's soft predictions replace the labels."""
from .teacher import BN_MODES, Refinery, freeze, load_teacher

__all__ = ["BN_MODES", "Refinery", "freeze", "load_teacher"]
