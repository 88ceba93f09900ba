"""Label-refinery soft-target loss (arXiv 1805.02641) on scaled cosines."""
import torch


def refined_targets(teacher_logits):
    """The teacher's soft labels: softmax of its logits (s * cos for a cosine head), in fp32."""
    return torch.softmax(teacher_logits.float(), dim=1)


def soft_target_loss(student_logits, teacher_logits):
    """Mean over the batch of -sum_k p_k log q_k, p from the teacher and q from the student."""
    p = refined_targets(teacher_logits).detach()
    log_q = torch.log_softmax(student_logits.float(), dim=1)
    return -(p * log_q).sum(dim=1).mean()
