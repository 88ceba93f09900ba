"""Losses on the model's cosines: additive-margin softmax and the label-refinery soft-target loss."""
from .margin import AMSoftmaxLoss, am_softmax_loss, logits_from_output, make_criterion
from .refinery import refined_targets, soft_target_loss

__all__ = ["AMSoftmaxLoss", "make_criterion", "am_softmax_loss", "logits_from_output", "soft_target_loss",
           "refined_targets"]
