"""Knowledge distillation from a larger teacher (Hinton et al., 2015).

``loss = (1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T)
        [+ hidden_weight * MSE(proj(h_student), h_teacher)]``

All terms are token sums divided by ``outputs["norm"]`` (the target tokens of the
whole accumulated batch), exactly like the CE the trainer hands in, so gradient
accumulation stays equivalent to the large batch. The T^2 factor keeps the soft-target
gradients at the same scale as CE's when T changes.

The teacher is held by the technique, not by the model: it is not a submodule, so
the optimizer, DDP and checkpoints never see it; it runs in eval mode under
``no_grad``. The hidden-state projection (student d -> teacher d) is trained, so it
must exist before the optimizer: it is added to the student as ``distill_proj`` at
SURGERY (DDP then also averages its gradients). Inference exports drop it
(``tfx.compression.reload.inference_state_dict``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from tfx.ckpt import load_run_with_meta
from tfx.core.context import RunContext, StepInfo
from tfx.core.errors import ConfigError
from tfx.core.loss import IGNORE_INDEX
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.anatomy import require_own_gpt


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * sum_tokens KL(softmax(t/T) || softmax(s/T))`` over tokens where ``mask``."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        kl = kl * mask
    return kl.sum() * temperature ** 2


def hidden_mse_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                   proj: nn.Module, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token mean squared error over features, summed over tokens."""
    err = (proj(student_hidden).float() - teacher_hidden.float()).pow(2).mean(-1)
    if mask is not None:
        err = err * mask
    return err.sum()


def check_vocab(teacher_vocab: int, student_vocab: int, teacher_tok: Optional[str] = None,
                student_tok: Optional[str] = None) -> None:
    """KD compares distributions token by token, so both models must share a vocabulary."""
    if teacher_tok and student_tok and teacher_tok != student_tok:
        raise ConfigError(f"distillation teacher uses tokenizer {teacher_tok!r} but the student "
                          f"uses {student_tok!r}; train the teacher on the same data/tokenizer "
                          "config, or set data.tokenizer to the teacher's")
    if teacher_vocab != student_vocab:
        raise ConfigError(f"distillation teacher has vocab_size={teacher_vocab} but the student "
                          f"has {student_vocab}; they must share one tokenizer")


class _HubTeacher(nn.Module):
    """A transformers causal LM behind the tfx ``forward(idx, return_hidden)`` signature."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM  # optional dependency, needs network

        self.lm = AutoModelForCausalLM.from_pretrained(name)
        self.vocab_size = self.lm.config.vocab_size
        self.tokenizer_id = f"hub:{name}"

    def forward(self, idx, return_hidden: bool = False):
        out = self.lm(input_ids=idx, output_hidden_states=return_hidden)
        return (out.logits, out.hidden_states[-1]) if return_hidden else out.logits


def load_teacher(teacher: str, source: str = "tfx") -> Tuple[nn.Module, int, Optional[str]]:
    """(model, vocab_size, tokenizer_id) for a tfx run/checkpoint or a hub model name."""
    if source == "hub":
        m = _HubTeacher(teacher)
        return m, m.vocab_size, m.tokenizer_id
    model, _, meta = load_run_with_meta(teacher)  # vocab_size / tokenizer_id live next to the weights
    return model, meta.get("vocab_size", model.cfg.vocab_size), meta.get("tokenizer_id")


def _width(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg.d_model
    return model.lm.config.hidden_size


class Distillation(Technique):
    """Train the student against a frozen teacher's soft targets.

    ``teacher``: path of a tfx run or checkpoint (``source: tfx``) or a hub model name
    (``source: hub``, needs ``transformers`` and network); an ``nn.Module`` also works
    from Python. ``hidden_weight > 0`` adds hidden-state matching through a learned
    projection (the trainer then passes ``outputs["hidden"]``).

    On resume and in ``tfx.ckpt.load_run`` (``ctx.resuming``) the projection is
    rebuilt from the teacher width the checkpoint recorded (:meth:`structure`) and the
    teacher itself is only loaded when a loss needs it, so evaluating a distilled run
    never loads its teacher.
    """

    name = "distill"
    stage = Stage.SURGERY

    def __init__(self, teacher: Union[str, nn.Module, None] = None, source: str = "tfx",
                 alpha: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0) -> None:
        if not (0 <= alpha <= 1 and 0 < temperature < math.inf and 0 <= hidden_weight < math.inf):
            raise ConfigError(f"compression.distill needs 0 <= alpha <= 1, temperature > 0, "
                              f"hidden_weight >= 0 (finite); got alpha={alpha}, "
                              f"temperature={temperature}, hidden_weight={hidden_weight}")
        if not (teacher is None or isinstance(teacher, nn.Module) or (isinstance(teacher, str) and teacher)):
            raise ConfigError(f"compression.distill.teacher={teacher!r} must be the path of a trained "
                              f"tfx run (or a hub model name with source=hub)")
        if source not in ("tfx", "hub"):
            raise ConfigError(f"compression.distill.source={source!r}; choose 'tfx' or 'hub'")
        self.teacher_spec, self.source = teacher, source
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.teacher: Optional[nn.Module] = None
        self.proj: Optional[nn.Module] = None
        self.teacher_width: Optional[int] = None  # recorded, so a reload needs no teacher
        self.needs_hidden = hidden_weight > 0
        # Only the projection changes the student's structure (its weights are in the
        # checkpoint); without it there is nothing to rebuild on load.
        self.reapply_on_load = self.needs_hidden

    def validate(self, plan: Plan) -> None:
        require_own_gpt(plan, "compression=distill", "trains a student")
        if self.teacher_spec is None:
            raise ConfigError("compression.distill.teacher is required: the path of a trained "
                              "(larger) tfx run, e.g. compression.distill.teacher=outputs/big")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        if ctx.resuming:  # the checkpoint recorded the width; load the teacher on first use
            self.teacher_width = ctx.structure_of(self).get("teacher_width")
        else:  # fresh start: load and check the teacher now
            self._load_teacher(ctx, model.cfg.vocab_size)
            self.teacher_width = _width(self.teacher)
        if self.needs_hidden:
            model.distill_proj = nn.Linear(model.cfg.d_model, self.teacher_width, bias=False,
                                           device=ctx.device)
            self.proj = model.distill_proj
        return model

    def _load_teacher(self, ctx: RunContext, student_vocab: int) -> None:
        self.validate(None)
        if isinstance(self.teacher_spec, nn.Module):
            teacher = self.teacher_spec
            vocab, tok = teacher.cfg.vocab_size, getattr(teacher, "tokenizer_id", None)
        else:
            teacher, vocab, tok = load_teacher(self.teacher_spec, self.source)
        check_vocab(vocab, student_vocab, tok, ctx.tokenizer_id)
        self.teacher = teacher.to(ctx.device).eval().requires_grad_(False)

    def transform_loss(self, loss, batch, outputs, info: StepInfo, ctx: RunContext):
        if self.teacher is None:  # resumed run: the teacher is loaded on first use
            self._load_teacher(ctx, outputs["logits"].shape[-1])
        idx, targets = batch["input_ids"], batch["labels"]
        mask = (targets != IGNORE_INDEX).float()
        amp = (torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype)
               if ctx.autocast_dtype is not None else contextlib.nullcontext())
        with torch.no_grad(), amp:
            t_logits, t_hidden = self.teacher(idx, return_hidden=True)
        norm = outputs["norm"]
        kd = kd_loss_sum(outputs["logits"], t_logits, self.temperature, mask) / norm
        total = (1 - self.alpha) * loss + self.alpha * kd
        if self.needs_hidden:
            total = total + self.hidden_weight * hidden_mse_sum(
                outputs["hidden"], t_hidden, self.proj, mask) / norm
        return total

    def structure(self):
        return {"teacher_width": self.teacher_width} if self.needs_hidden else {}
