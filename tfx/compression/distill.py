"""Knowledge distillation from a larger teacher (Hinton et al., 2015).

``loss = (1 - w*alpha) * CE + w*alpha * T^2 * KL(p_teacher^T || p_student^T)
        [+ w*hidden_weight * MSE(proj(h_student), h_teacher)]``

with ``w`` the warm-up ramp (``min(1, step / warmup)``; 1 without warm-up). All terms
are token sums divided by ``outputs["norm"]`` (the target tokens of the whole
accumulated batch), exactly like the CE the trainer hands in, so gradient accumulation
stays equivalent to the large batch. The T^2 factor keeps the soft-target gradients at
the same scale as CE's when T changes.

The teacher is a trained tfx run, or a Hugging Face causal LM (a hub id, a local
folder, a ``.gguf`` file, or the offline preset ``smollm2-135m-instruct-gguf``),
loaded through :func:`tfx.model.hf.load_causal_lm`. The student is any model tfx
trains: its own GPT or an HF model (``model=hf``, ``model=smollm2_student``).

The teacher is held by the technique, not by the model: it is not a submodule, so
the optimizer, DDP and checkpoints never see it; it runs in eval mode under
``no_grad`` and the run's autocast, on the student's device. The hidden-state
projection (student d -> teacher d) is trained, so it must exist before the
optimizer: it is added to the student as ``distill_proj`` at SURGERY (DDP then also
averages its gradients). Inference exports drop it
(``tfx.compression.reload.inference_state_dict``).

KD compares distributions token by token, so teacher and student must produce the
same token ids: the teacher's tokenizer must be the one the student's data was
tokenized with. Tokenizers are compared by content (:func:`tfx.model.hf.tokenizer_id`,
the hash the data cache keys pretrained tokenizers by), not by name or path.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from tfx.ckpt import load_run_with_meta
from tfx.core.context import RunContext, StepInfo
from tfx.core.errors import ConfigError
from tfx.core.loss import IGNORE_INDEX
from tfx.core.schedule import StepSpec, check_within, resolve_step
from tfx.core.technique import Plan, Stage, Technique
from tfx.data import to_data_config
from tfx.data.pack import cache_path
from tfx.data.tokenizer import load_tokenizer as load_data_tokenizer
from tfx.data.tokenizer import tokenizer_cache_id
from tfx.model.anatomy import anatomy_of, is_hf_spec
from tfx.model.hf import SMOLLM2_PRESET, CausalLM, load_causal_lm, load_tokenizer, tokenizer_id

SOURCES = ("auto", "tfx", "hf")


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


def check_tokenizer(teacher_tok: Optional[str], student_tok: Optional[str],
                    fix: str = "set data.tokenizer to the teacher's") -> None:
    """KD compares distributions token by token, so the teacher's tokenizer must be the
    one the student's data was tokenized with. ``teacher_tok``/``student_tok``: two
    comparable ids (content hashes, or data cache names); skipped when either is
    unknown. ``fix``: what to set, ending the one-line ConfigError."""
    if teacher_tok and student_tok and teacher_tok != student_tok:
        raise ConfigError(f"compression.distill: the teacher's tokenizer ({teacher_tok}) is not the "
                          f"one the student's data was tokenized with ({student_tok}), so their token "
                          f"ids differ; {fix}")


def check_vocab(teacher_vocab: int, student_vocab: int, teacher_tok: Optional[str] = None,
                student_tok: Optional[str] = None,
                fix: str = "set data.tokenizer to the teacher's") -> None:
    """Both models must share a tokenizer (:func:`check_tokenizer`) and a vocabulary."""
    check_tokenizer(teacher_tok, student_tok, fix)
    if teacher_vocab != student_vocab:
        raise ConfigError(f"distillation teacher has vocab_size={teacher_vocab} but the student "
                          f"has {student_vocab}; they must share one tokenizer")


def kd_vocab(teacher_vocab: int, student_vocab: int, data_vocab: Optional[int] = None) -> int:
    """How many logits KD compares. Equal widths: all. Different widths (an embedding
    padded past its tokenizer, e.g. SmolLM2-style HF models against a tfx GPT sized to
    the tokenizer) are fine when both cover the data's ``data_vocab`` tokens: the
    first ``min`` logits are compared, the teacher's distribution renormalised over
    ids the student can predict. Otherwise a ConfigError."""
    if teacher_vocab == student_vocab:
        return teacher_vocab
    if data_vocab is not None and min(teacher_vocab, student_vocab) >= data_vocab:
        return min(teacher_vocab, student_vocab)
    check_vocab(teacher_vocab, student_vocab)
    return teacher_vocab  # unreachable: check_vocab raised


# --- which tokenizer each side uses ---------------------------------------------------

def teacher_source(teacher: str, source: str = "auto") -> str:
    """``tfx`` or ``hf`` for a teacher string. ``auto``: an existing path that is not an
    HF model folder (no ``config.json``) nor a ``.gguf`` file is a tfx run or
    checkpoint; anything else (a model folder, a ``.gguf``, a hub id, the preset) is HF."""
    if source != "auto":
        return source
    path = Path(os.path.expanduser(teacher))
    if not path.exists() or teacher.endswith(".gguf") or (path / "config.json").is_file():
        return "hf"
    return "tfx"


def hf_tokenizer_id(name: str) -> str:
    """Content id of the tokenizer of HF model ``name`` (folder, hub id, preset)."""
    return tokenizer_id(load_tokenizer(name))


def data_tokenizer_id(ctx: RunContext) -> Optional[str]:
    """Content id of the tokenizer the student's data was tokenized with, read from the
    data cache next to the memory-mapped train split (``tokenizer.json``); None when
    the run has no such cache (a model checked outside a training run).

    A workaround: the run context carries only the data cache's name
    (``ctx.tokenizer_id``), which changes with the data as well as the tokenizer."""
    filename = getattr(getattr(ctx.train_data, "tokens", None), "filename", None)
    path = Path(filename).parent / "tokenizer.json" if filename else None
    if path is None or not path.is_file():
        return None
    tok = load_data_tokenizer(path)
    return tok.id if hasattr(tok, "id") else "bytes"


def _fix(tok: Dict[str, Any], data: Dict[str, Any]) -> str:
    """What to set so that a student's data is tokenized like a teacher run's ``data``."""
    kind = tok.get("kind")
    if kind in ("pretrained", "hub"):
        return f"set data.tokenizer.kind={kind} data.tokenizer.name={tok.get('name')}"
    if kind == "bytes":
        return "set data.tokenizer.kind=bytes"
    # a BPE tokenizer is trained on the data, so the data settings must match too
    return (f"train the student on the teacher run's data and tokenizer (data.source={data.get('source')} "
            f"data.tokenizer.kind=bpe data.tokenizer.vocab_size={tok.get('vocab_size')})")


def run_tokenizer(meta: Dict[str, Any]) -> Tuple[Optional[str], Optional[str], str]:
    """``(content id or None, data cache name or None, fix)`` of the tokenizer a tfx
    teacher run's data used, from its checkpoint meta. The content id comes from the
    run's data cache (or, for a model's own tokenizer, from the tokenizer itself); when
    neither is readable the cache name is all there is to compare."""
    data = (meta.get("config") or {}).get("data") or {}
    tok = data.get("tokenizer") or {}
    fix = _fix(tok, data)
    content = None
    try:
        cfg = to_data_config(data)
        content = tokenizer_cache_id(cfg.tokenizer) if cfg.tokenizer.kind in ("pretrained", "hub") \
            else ("bytes" if cfg.tokenizer.kind == "bytes" else None)
        if content is None:
            path = cache_path(cfg) / "tokenizer.json"
            if path.is_file():
                content = load_data_tokenizer(path).id
    except Exception:  # noqa: BLE001 - another machine's cache or config: compare cache names
        content = None
    return content, meta.get("tokenizer_id"), fix


def _dims(model: nn.Module) -> Tuple[int, int]:
    """``(logits width, hidden width)`` of a tfx GPT or a wrapped HF model."""
    anat = anatomy_of(model)
    return anat.head(model).weight.shape[0], anat.embeddings(model).token.weight.shape[1]


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, CausalLM)


def _hf_student_fix(student: str) -> str:
    return (f"an HF student tokenizes with its own tokenizer ({student}), so choose a student "
            f"built on the teacher's (for {SMOLLM2_PRESET}: model=smollm2_student)")


def load_teacher(teacher: str, source: str = "auto") -> Tuple[nn.Module, Optional[str], Optional[str], str]:
    """``(model, tokenizer content id, data cache name or None, fix)`` for a tfx run or
    checkpoint or a Hugging Face model; ``fix`` says what makes a student's data use
    the teacher's tokenizer. The model is in eval mode on CPU."""
    if teacher_source(teacher, source) == "hf":
        return (CausalLM(load_causal_lm(teacher, pretrained=True)), hf_tokenizer_id(teacher), None,
                _hf_fix(teacher))
    model, _, meta = load_run_with_meta(teacher)
    return (model, *run_tokenizer(meta))


def _hf_fix(teacher: str) -> str:
    return f"set data.tokenizer.kind=pretrained data.tokenizer.name={teacher}"


class Distillation(Technique):
    """Train the student against a frozen teacher's soft targets.

    ``teacher``: a tfx run directory or checkpoint, or a Hugging Face causal LM (hub
    id, local folder, ``.gguf`` file, or ``smollm2-135m-instruct-gguf``); an
    ``nn.Module`` also works from Python. ``source``: ``auto`` (decided from the
    path, :func:`teacher_source`), ``tfx`` or ``hf``. ``hidden_weight > 0`` adds
    hidden-state matching through a learned projection (the trainer then passes
    ``outputs["hidden"]``). ``warmup``: the KD and hidden terms ramp linearly from 0
    to their weights over this many optimizer steps (int) or this fraction of
    ``trainer.max_steps`` (float); the teacher is not run while their weight is 0.

    On resume and in ``tfx.ckpt.load_run`` (``ctx.resuming``) the projection is
    rebuilt from the teacher width the checkpoint recorded (:meth:`structure`) and the
    teacher itself is only loaded when a loss needs it, so evaluating a distilled run
    never loads its teacher.
    """

    name = "distill"
    stage = Stage.SURGERY

    def __init__(self, teacher: Union[str, nn.Module, None] = None, source: str = "auto",
                 alpha: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0,
                 warmup: StepSpec = 0) -> None:
        if not (0 <= alpha <= 1 and 0 < temperature < math.inf and 0 <= hidden_weight < math.inf):
            raise ConfigError(f"compression.distill needs 0 <= alpha <= 1, temperature > 0, "
                              f"hidden_weight >= 0 (finite); got alpha={alpha}, "
                              f"temperature={temperature}, hidden_weight={hidden_weight}")
        if not (teacher is None or isinstance(teacher, nn.Module) or (isinstance(teacher, str) and teacher)):
            raise ConfigError(f"compression.distill.teacher={teacher!r} must be the path of a trained "
                              f"tfx run, or a Hugging Face model (folder, hub id or {SMOLLM2_PRESET})")
        if source not in SOURCES:
            raise ConfigError(f"compression.distill.source={source!r}; choose one of {list(SOURCES)}")
        resolve_step(warmup, 1, "compression.distill.warmup")  # type and range; the run is checked in validate
        self.teacher_spec, self.source = teacher, source
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.warmup = warmup
        self.teacher: Optional[nn.Module] = None
        self.proj: Optional[nn.Module] = None
        self.teacher_width: Optional[int] = None  # recorded, so a reload needs no teacher
        self.student_vocab: Optional[int] = None
        self.kd_vocab: Optional[int] = None  # logits KD compares (see kd_vocab)
        self._hf_student: Optional[str] = None  # an HF student's tokenizer (its model name)
        self.needs_hidden = hidden_weight > 0
        # at warm-up's first step the projection gets no gradient: DDP must expect that
        self.has_unused_parameters = self.needs_hidden and warmup != 0
        # Only the projection changes the student's structure (its weights are in the
        # checkpoint); without it there is nothing to rebuild on load.
        self.reapply_on_load = self.needs_hidden
        self._weight, self._kd = 1.0, None  # for metrics()

    # -- before anything is built --------------------------------------------------
    def validate(self, plan: Plan) -> None:
        if self.teacher_spec is None:
            raise ConfigError("compression.distill.teacher is required: a trained (larger) tfx run, "
                              "e.g. compression.distill.teacher=outputs/big, or a Hugging Face model, "
                              f"e.g. compression.distill.teacher={SMOLLM2_PRESET}")
        owner = next((t for t in getattr(plan, "techniques", []) if t.owns_forward), None)
        if owner is not None:  # its schedule computes the loss itself: no transform_loss, no KD
            raise ConfigError(f"compression=distill needs the student's whole logits in one forward, "
                              f"but {owner.key} runs the forward itself (pipeline stages); use "
                              f"parallel=ddp or fsdp")
        sharded = [t.key for t in getattr(plan, "techniques", []) if t.stage == Stage.TENSOR]
        if sharded:  # loss parallel leaves the logits sharded over the vocabulary
            raise ConfigError(f"compression=distill with {sharded} is not supported (tensor parallel "
                              f"shards the logits over the vocabulary; the KD softmax needs them whole); "
                              f"use parallel=ddp or fsdp")
        max_steps = getattr(plan, "max_steps", None)
        step = resolve_step(self.warmup, max_steps, "compression.distill.warmup")
        check_within("compression.distill.warmup", step, max_steps)
        spec = getattr(plan, "model", None)
        if isinstance(self.teacher_spec, str) and teacher_source(self.teacher_spec, self.source) == "hf":
            try:  # a bad name fails here, before data
                teacher_tok = hf_tokenizer_id(self.teacher_spec)
            except ConfigError as err:
                raise ConfigError(f"compression.distill.teacher={self.teacher_spec!r}: {err} (a tfx "
                                  f"teacher is an existing run directory or checkpoint)") from None
            if is_hf_spec(spec):  # the data will use the student's own tokenizer: compare now
                student = spec.tokenizer_config()["name"]
                check_tokenizer(teacher_tok, hf_tokenizer_id(student), _hf_student_fix(student))

    def _warmup_steps(self, ctx: RunContext) -> int:
        if self.warmup == 0:
            return 0
        return resolve_step(self.warmup, ctx.max_steps, "compression.distill.warmup")

    def weight(self, step: int, ctx: RunContext) -> float:
        """The ramp ``w`` at ``step`` optimizer steps taken: ``min(1, step / warmup)``."""
        warm = self._warmup_steps(ctx)
        return 1.0 if warm <= 0 else min(1.0, step / warm)

    # -- building ------------------------------------------------------------------
    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.student_vocab, student_width = _dims(model)
        self._hf_student = (model.tokenizer_name or "model.name_or_path") if _is_hf(model) else None
        if ctx.resuming:  # the checkpoint recorded the width; load the teacher on first use
            self.teacher_width = ctx.structure_of(self).get("teacher_width")
        else:  # fresh start: load and check the teacher now
            self._load_teacher(ctx)
        if self.needs_hidden:
            model.distill_proj = nn.Linear(student_width, self.teacher_width, bias=False,
                                           device=ctx.device)
            self.proj = model.distill_proj
        return model

    def _load_teacher(self, ctx: RunContext) -> None:
        student_tok = data_tokenizer_id(ctx)
        if isinstance(self.teacher_spec, nn.Module):
            teacher = self.teacher_spec
            self._check_tokenizer(None, student_tok, getattr(teacher, "tokenizer_id", None), ctx,
                                  "set data.tokenizer to the teacher's")
        elif teacher_source(self.teacher_spec, self.source) == "hf":
            # the tokenizer first: a mismatch fails before the weights are read
            self._check_tokenizer(hf_tokenizer_id(self.teacher_spec), student_tok, None, ctx,
                                  _hf_fix(self.teacher_spec))
            teacher = CausalLM(load_causal_lm(self.teacher_spec, pretrained=True))
        else:
            teacher, content, cache_name, fix = load_teacher(self.teacher_spec, "tfx")
            self._check_tokenizer(content, student_tok, cache_name, ctx, fix)
        vocab, self.teacher_width = _dims(teacher)
        self.kd_vocab = kd_vocab(vocab, self.student_vocab, ctx.vocab_size)
        self.teacher = teacher.to(ctx.device).eval().requires_grad_(False)

    def _check_tokenizer(self, content: Optional[str], student_tok: Optional[str],
                         cache_name: Optional[str], ctx: RunContext, fix: str) -> None:
        if self._hf_student is not None:  # its data always uses its own tokenizer
            fix = _hf_student_fix(self._hf_student)
        if content is not None and student_tok is not None:  # both contents known: compare them
            check_tokenizer(content, student_tok, fix)
        elif cache_name is not None:  # only the teacher run's data cache name is known
            check_tokenizer(cache_name, ctx.tokenizer_id, fix)

    # -- every micro-step ------------------------------------------------------------
    def transform_loss(self, loss, batch, outputs, info: StepInfo, ctx: RunContext):
        w = self.weight(info.step, ctx)
        self._weight = w
        if w == 0.0:  # warm-up start: plain cross-entropy, the teacher is not run
            return loss
        if self.teacher is None:  # resumed run: the teacher is loaded on first use
            self._load_teacher(ctx)
        idx, targets = batch["input_ids"], batch["labels"]
        mask = (targets != IGNORE_INDEX).float()
        amp = (torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype)
               if ctx.autocast_dtype is not None else contextlib.nullcontext())
        with torch.no_grad(), amp:
            out = self.teacher(idx, return_hidden=self.needs_hidden)
        t_logits, t_hidden = out if self.needs_hidden else (out, None)
        norm = outputs["norm"]
        s_logits, v = outputs["logits"], self.kd_vocab
        if s_logits.shape[-1] != v or t_logits.shape[-1] != v:  # padded embeddings: see kd_vocab
            s_logits, t_logits = s_logits[..., :v], t_logits[..., :v]
        kd = kd_loss_sum(s_logits, t_logits, self.temperature, mask) / norm
        self._kd = kd.detach()
        alpha = w * self.alpha
        total = (1 - alpha) * loss + alpha * kd
        if self.needs_hidden:
            total = total + w * self.hidden_weight * hidden_mse_sum(
                outputs["hidden"], t_hidden, self.proj, mask) / norm
        return total

    def metrics(self) -> Dict[str, float]:
        out = {"distill/weight": self._weight}
        if self._kd is not None:
            out["distill/kd"] = float(self._kd)
        return out

    def structure(self):
        return {"teacher_width": self.teacher_width} if self.needs_hidden else {}
