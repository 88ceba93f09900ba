"""Label refinery (arXiv 1805.02641): a frozen teacher's soft predictions replace the labels."""
from .teacher import Refinery, load_teacher

__all__ = ["Refinery", "load_teacher"]
