"""BERT's dropout and attention on CPU, the same math in fewer passes (pretraining and finetuning).

    from scaling_study.cpu_kernels import use_cpu_kernels
    model = use_cpu_kernels(BertForMaskedLM(config))   # in place; checkpoints still load as plain BERT

"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# On CPU, torch's dropout draws a float per element from its Mersenne Twister (bernoulli_) and
# SDPA with dropout falls back to its math path (q and k scaled separately, a "safe" softmax that
# checks every row for -inf, and that same dropout): 11% and 7% of a BERT-mini step. The kernels
# below compute the same thing, Bernoulli(1 - p) masks scaled by 1 / (1 - p) and
# softmax(q k^T / sqrt(d)) v, from two 32-bit draws per 64-bit random word of the same generator
# (so checkpoints resume the same stream), in fewer passes over memory.
CPU_ATTENTION = "scaling_study_cpu"


def dropout_cpu(x: torch.Tensor, p: float) -> torch.Tensor:
    """x * Bernoulli(1 - p) / (1 - p): drop where a uniform 32-bit integer falls below p * 2^32."""
    n = x.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_(-2**63, None)
    keep = words.view(torch.int32)[:n].view(x.shape) >= round(p * 2**32) - 2**31
    return x * (keep * (1.0 / (1.0 - p)))


class DropoutCPU(nn.Dropout):
    """nn.Dropout through `dropout_cpu` (a subclass: isinstance checks and repr still see Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_cpu(x, self.p) if self.training and self.p > 0 else x


def attention_cpu(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A Hugging Face attention function (AttentionInterface): softmax(q k^T * scaling + mask) v."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(2, 3))  # scaling q is half the work of scaling q k^T
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(-1)
    if dropout > 0:
        probs = dropout_cpu(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2), None


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Switch a BERT model's dropout and attention to the CPU kernels above, in place.

    Weights, config.json and what `save_pretrained` writes are unchanged (the attention
    implementation is not saved), so checkpoints load as plain BertForMaskedLM.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CPU_ATTENTION, attention_cpu)
    # and its padding mask, additive as `attention_cpu` adds it: without one registered, transformers
    # passes none, and padded positions would be attended to (finetuning pads; pretraining does not)
    AttentionMaskInterface.register(CPU_ATTENTION, eager_mask)
    model.config._attn_implementation = CPU_ATTENTION
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, DropoutCPU(child.p).train(child.training))
    return model
