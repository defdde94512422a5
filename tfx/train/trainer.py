"""The training loop: accumulation, clipping, evaluation, checkpoints, logging, and
when to stop (``trainer.max_steps``, a token or time budget, a target loss).

Everything technique-specific goes through :class:`tfx.core.Pipeline` hooks; the
loop itself only knows about micro-steps, optimizer steps and the loss normaliser.

Host-device synchronisation (docs/metrics.md): none inside a micro-step. The target
tokens of a step are counted on the host from the CPU batches before they move to
the device, the loss is summed on the device, and the loop reads it once per
optimizer step, together with the gradient norm when a technique returns it as a
tensor, because the non-finite guard must decide on the host whether to step.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from tfx.ckpt import CheckpointManager, RNGState, latest_checkpoint
from tfx.config import TrainerConfig
from tfx.core import Pipeline, RunContext, StepInfo, TrainingError
from tfx.core.loss import IGNORE_INDEX, ce_sum
from tfx.data import BlockLoader, TokenBlocks
from tfx.evaluation import evaluate_lm
from tfx.flops import Flops
from tfx.log import MetricsWriter, peak_memory_mb


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (tensor-parallel loss) as the full tensor; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class LoopState:
    """The loop's counters; a stateful part of every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0       # consecutive non-finite losses (not checkpointed: never saved in a streak)
    scaler_skips: int = 0    # consecutive steps fp16's loss scaler skipped (inf/nan gradients)
    skipped_steps: int = 0
    train_seconds: float = 0.0  # wall-clock seconds in the loop, over all resumes (trainer.budget_seconds)
    #: the first evaluation at or below ``trainer.target_loss``: step, tokens_seen,
    #: train_seconds and val_loss then (kept across resumes)
    target: Optional[Dict[str, float]] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "train_seconds": self.train_seconds, "target": self.target}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.target = state.get("target")


#: Why :meth:`Trainer.fit` returned. All but ``signal`` end the run normally (final
#: checkpoint, evaluation and export); ``signal`` (SIGTERM/SIGINT or
#: :meth:`Trainer.request_stop`) saves a checkpoint to resume from and skips the export.
STOP_REASONS = ("max_steps", "budget_tokens", "budget_seconds", "target_loss", "signal")


class Trainer:
    def __init__(self, model: nn.Module, optimizer, scheduler, pipeline: Pipeline,
                 loader: BlockLoader, val_blocks: TokenBlocks, ctx: RunContext, loop: TrainerConfig,
                 metrics: MetricsWriter, ckpt_dir: Path, wandb=None,
                 checkpoint_meta: Optional[Dict[str, Any]] = None,
                 flops: Optional[Flops] = None, tokenizer=None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.pipeline, self.loader, self.val_blocks = pipeline, loader, val_blocks
        self.ctx, self.loop, self.metrics, self.wandb = ctx, loop, metrics, wandb
        self.flops = flops  # MFU/HFU: FLOPs per token and the peak (tfx.flops)
        self.tokenizer = tokenizer  # evaluation reports bits per byte with it
        self.state = LoopState()
        self.checkpoints = CheckpointManager(
            ckpt_dir, model, optimizer,
            parts={"scheduler": scheduler, "techniques": pipeline, "loader": loader,
                   "rng": RNGState(), "loop": self.state},
            meta={**(checkpoint_meta or {}), "technique_order": pipeline.order(),
                  "structure": pipeline.structure()},
            keep_last=loop.keep_last, distributed=ctx.distributed, is_main=ctx.is_main)
        self.callbacks: List[Callable[["Trainer"], None]] = []
        self._stop_reason: Optional[str] = None  # set by a signal or request_stop

    # -- stopping ------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Finish the current step, save a checkpoint, and return from :meth:`fit`
        (``stop_reason`` ``signal``: an interruption to resume from, not an end)."""
        self._stop_reason = reason

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.request_stop(f"received {signal.Signals(signum).name}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any: ranks must stop at the same step
        (their clocks differ). One all-reduce, only where a decision can differ."""
        if not self.ctx.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _budget_reached(self) -> Optional[str]:
        """``budget_tokens`` or ``budget_seconds`` once the loop has used it up."""
        loop, state = self.loop, self.state
        if loop.budget_tokens is not None and state.tokens_seen >= loop.budget_tokens:
            return "budget_tokens"  # tokens_seen is global: the same on every rank
        if loop.budget_seconds is not None and self._agree(state.train_seconds >= loop.budget_seconds):
            return "budget_seconds"
        return None

    def target_record(self) -> Optional[Dict[str, float]]:
        """The first evaluation that reached ``trainer.target_loss`` (None if none did; a
        resume with a lower target forgets one that no longer reaches it)."""
        rec, target = self.state.target, self.loop.target_loss
        return rec if rec is not None and target is not None and rec["val_loss"] <= target else None

    def note_eval(self, val_loss: float) -> bool:
        """Record the first evaluation at or below ``trainer.target_loss``; True then."""
        target = self.loop.target_loss
        if target is None or self.target_record() is not None:
            return False
        if not self._agree(math.isfinite(val_loss) and val_loss <= target):
            return False
        self.state.target = {"step": self.state.step, "tokens": self.state.tokens_seen,
                             "seconds": self.state.train_seconds, "val_loss": val_loss}
        return True

    def _finished(self) -> Optional[str]:
        """Why the run is over before (another) step: a resumed run may already be."""
        if self.state.step >= self.loop.max_steps:
            return "max_steps"
        if self.target_record() is not None:
            return "target_loss"
        return self._budget_reached()

    # -- one optimizer step ----------------------------------------------------------
    def _global_norm(self, micro_batches) -> float:
        """Target tokens in the global batch, counted on the host from the CPU labels
        (no device involved); under data parallelism summed over the ranks (NCCL:
        one read before the micro-steps)."""
        n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        if self.ctx.dp_size > 1:
            t = torch.tensor([n], dtype=torch.float64, device=self.ctx.device)
            dist.all_reduce(t)  # over all ranks: each dp replica counts its own tokens
            n = int(t.item()) * self.ctx.dp_size // dist.get_world_size()
        return float(n)

    def train_step(self) -> Dict[str, float]:
        loop, ctx = self.loop, self.ctx
        micro = [next(self.loader) for _ in range(loop.accum_steps)]
        norm = self._global_norm(micro)
        # DDP/FSDP average gradients over dp ranks: undo it so the sum is over tokens.
        loss_mult = float(ctx.dp_size)
        self.model.train()
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for i, batch in enumerate(micro):
            total += self._micro_step(batch, norm, loss_mult, StepInfo(self.state.step, i, loop.accum_steps))
        return self._optimizer_step(total, int(norm))

    def _micro_step(self, batch, norm: float, loss_mult: float, info: StepInfo) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its share of the objective
        (before ``loss_mult``) as a float64 device scalar. Never reads a device value
        (tests/test_sync_free.py)."""
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
        owner = self.pipeline.forward_owner()
        if owner is not None:  # pipeline parallel runs its own schedule
            with self.pipeline.step_context(self.model, info, self.ctx):
                loss = owner.forward_backward(self.model, batch, norm, loss_mult, info, self.ctx)
        else:
            loss = self._forward_backward(batch, norm, loss_mult, info)
        return _plain(loss.detach()).double()

    def _forward_backward(self, batch, norm: float, loss_mult: float, info: StepInfo) -> torch.Tensor:
        """One micro-step; returns its share of the objective (before ``loss_mult``)."""
        ctx = self.ctx
        with self.pipeline.step_context(self.model, info, ctx):
            needs_hidden = ctx.facts.needs_hidden
            out = self.model(batch["input_ids"], return_hidden=True) if needs_hidden \
                else self.model(batch["input_ids"])
            logits, hidden = (out if needs_hidden else (out, None))
            s = ce_sum(logits, batch["labels"])
            outputs = {"logits": logits, "hidden": hidden, "ce_sum": s, "norm": norm}
            loss = self.pipeline.transform_loss(s / norm, batch, outputs, info, ctx)
        with self.pipeline.backward_context(self.model, info, ctx):
            self.pipeline.scale_loss(loss * loss_mult).backward()
        return loss

    def _optimizer_step(self, total: torch.Tensor, tokens: int) -> Dict[str, float]:
        """``total``: this rank's share of the objective (sums to the mean over ranks);
        ``tokens``: target tokens in the whole global batch."""
        info = StepInfo(self.state.step, self.loop.accum_steps - 1, self.loop.accum_steps)
        if self.ctx.dp_size > 1:
            dist.all_reduce(total)
            total /= dist.get_world_size() / self.ctx.dp_size
        self.pipeline.before_optimizer_step(self.model, self.optimizer, info, self.ctx)
        grad_norm: Any = float("nan")
        if self.loop.grad_clip:
            grad_norm = self.pipeline.clip_grad_norm(self.model, self.loop.grad_clip)
        loss, grad_norm = self._read(total, grad_norm)
        applied = self._guarded_step(loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.pipeline.after_optimizer_step(self.model, StepInfo(self.state.step, 0, self.loop.accum_steps), self.ctx)
        return {"loss": loss, "grad_norm": grad_norm, "applied": float(applied)}

    @staticmethod
    def _read(total: torch.Tensor, grad_norm) -> tuple:
        """The loop's one device read per optimizer step: the loss and, when it is
        still a tensor, the gradient norm, copied to the host together."""
        if isinstance(grad_norm, torch.Tensor):
            values = torch.stack([total, _plain(grad_norm.detach()).to(total)]).tolist()
            return values[0], values[1]
        return total.item(), float(grad_norm)

    def _guarded_step(self, loss: float, grad_norm: float = float("nan")) -> bool:
        """Step unless the loss (or, when clipping, the gradient norm) is non-finite.
        fp16's scaler sees every step and skips those with inf/nan gradients itself.
        Stops with a :class:`TrainingError` after ``trainer.max_bad_steps`` consecutive
        non-finite losses (any precision) or ``trainer.max_scaler_skips`` consecutive
        scaler skips."""
        state, loop = self.state, self.loop
        scaler = self.ctx.facts.skips_nonfinite
        # without a scaler, a non-finite clipping norm means non-finite gradients: a bad step too
        bad = not math.isfinite(loss) or (not scaler and bool(loop.grad_clip) and not math.isfinite(grad_norm))
        applied = bool(self.pipeline.optimizer_step(self.optimizer)) if scaler or not bad else False
        state.bad_steps = state.bad_steps + 1 if bad else 0
        state.scaler_skips = 0 if applied or not scaler else state.scaler_skips + 1
        if not applied:
            state.skipped_steps += 1
        if state.bad_steps >= loop.max_bad_steps:
            raise TrainingError(f"loss was non-finite for {state.bad_steps} consecutive steps at step "
                                f"{state.step + 1}; lower optim.lr or use precision=fp32"
                                f"{self._last_good()}")
        if scaler and state.scaler_skips >= loop.max_scaler_skips:
            raise TrainingError(f"the fp16 loss scaler skipped {state.scaler_skips} consecutive steps "
                                f"(inf/nan gradients) at step {state.step + 1}; lower optim.lr or use "
                                f"precision=bf16 or fp32{self._last_good()}")
        return applied

    def _last_good(self) -> str:
        """No checkpoint is written inside a streak: the newest one is the last good one."""
        last = self.checkpoints.last or latest_checkpoint(self.checkpoints.ckpt_dir)
        return f"; last good checkpoint: {last}" if last else "; no checkpoint was written"

    # -- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, blocks: Optional[TokenBlocks] = None, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Validation loss, ppl, bits per token and per byte; through the technique that
        owns the forward (pipeline stages) when there is one."""
        owner = self.pipeline.forward_owner()
        ce = (lambda model, batch: owner.eval_ce_sum(model, batch, self.ctx)) if owner is not None else None
        with self.pipeline.step_context(self.model, StepInfo(self.state.step), self.ctx):
            return evaluate_lm(self.model, blocks or self.val_blocks, self.loop.batch_size,
                               self.ctx.device, max_batches=max_batches, ce_sum_fn=ce,
                               tokenizer=self.tokenizer)

    # -- checkpoints -----------------------------------------------------------------
    @property
    def last_ckpt(self) -> Optional[Path]:
        return self.checkpoints.last

    def checkpoint_state(self, tensors: bool = True) -> Dict[str, Any]:
        return self.checkpoints.state(tensors)

    def save_checkpoint(self) -> Optional[Path]:
        return self.checkpoints.save(self.state.step)

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore every stateful part, once (the build order calls this after every
        technique was applied and the optimizer exists)."""
        self.checkpoints.load(state)
        self._sync_lr()

    def _sync_lr(self) -> None:
        """The scheduler was built for this run's ``max_steps`` and only its position was
        loaded; set the learning rate of the resumed step from it, so that a changed
        ``trainer.max_steps`` applies from the first resumed step (unchanged, this gives
        the saved value bit for bit: the same ``base_lr * lambda(step)``)."""
        sched = self.scheduler
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    # -- the loop --------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train until ``trainer.max_steps``, a budget (``budget_tokens``,
        ``budget_seconds``), the target loss, or a signal, whichever comes first. Every
        end saves a checkpoint (unless inside a non-finite streak); ``stop_reason`` says
        which it was (:data:`STOP_REASONS`)."""
        loop, state = self.loop, self.state
        bar = self._progress_bar()
        window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
        step_times: List[float] = []
        last_eval: Dict[str, float] = {}
        clock = time.perf_counter()  # state.train_seconds grows by the loop's wall time
        reason = self._finished()
        while reason is None and self._stop_reason is None:
            t0 = time.perf_counter()
            tokens_before = state.tokens_seen
            out = self.train_step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            window["loss"] += out["loss"]  # a non-finite step shows as nan/inf, not as 0.0
            window["n"] += 1
            window["tokens"] += state.tokens_seen - tokens_before
            step = state.step
            state.train_seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            reason = "max_steps" if step >= loop.max_steps else self._budget_reached()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}")
            if step % loop.log_every == 0 or reason is not None:
                self._log_train(window, out, dt)
                window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
            if loop.eval_every and step % loop.eval_every == 0 and reason is None:
                # the last step is evaluated by the final evaluation (trainer.final_eval_batches)
                last_eval = self.evaluate(max_batches=loop.eval_batches)
                self._log({f"val/{k}": v for k, v in last_eval.items()})
                if self.note_eval(last_eval["loss"]):
                    reason = "target_loss"
            for cb in self.callbacks:
                cb(self)
            healthy = self._healthy()  # never checkpoint inside a non-finite or scaler-skip streak
            if loop.ckpt_every and step % loop.ckpt_every == 0 and reason is None and healthy \
                    and self._stop_reason is None:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        state.train_seconds += time.perf_counter() - clock
        if reason is None:  # a signal (or request_stop) ended the loop
            reason = "signal"
        if self._healthy():  # never a checkpoint of a non-finite or skip streak
            self.save_checkpoint()
        return {"step_times": step_times, "stopped": self._stop_reason if reason == "signal" else None,
                "stop_reason": reason, "last_eval": last_eval}

    def _healthy(self) -> bool:
        return self.state.bad_steps == 0 and self.state.scaler_skips == 0

    def _progress_bar(self):
        if not (self.loop.progress and self.ctx.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.loop.max_steps, initial=self.state.step, desc="train",
                    dynamic_ncols=True, mininterval=1.0)

    def _log_train(self, window, out, dt) -> None:
        elapsed = time.perf_counter() - window["t0"]
        tps = window["tokens"] / elapsed if elapsed > 0 else 0.0
        m = {"train/loss": window["loss"] / max(1, window["n"]),
             "train/lr": self.scheduler.get_last_lr()[0],
             "train/tokens_per_sec": tps,
             "train/step_time_ms": 1000 * elapsed / max(1, window["n"]),
             "train/grad_norm": out["grad_norm"],
             "train/peak_mem_mb": peak_memory_mb(self.ctx.device),
             "train/tokens_seen": self.state.tokens_seen,
             "train/seconds": self.state.train_seconds,
             **self.pipeline.metrics()}
        if self.flops is not None:
            m.update({f"train/{k}": v for k, v in self.flops.utilization(tps).items()})
        self._log(m)

    def _log(self, metrics: Dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        self.metrics.log(metrics, self.state.step)
        if self.wandb is not None:
            self.wandb.log(metrics, self.state.step)
