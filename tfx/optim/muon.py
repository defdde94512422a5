"""Muon for the hidden matrices, AdamW for everything else (``optim=muon``).

Muon (Jordan et al. 2024) orthogonalises the momentum of a 2-D weight with a few
Newton-Schulz iterations; it is meant for the *hidden* matrices only. Embeddings, the
output head, norms and biases keep AdamW, as in modded-nanogpt and torchtitan.

Which parameters are hidden matrices (:func:`split_parameters`), found by module type
and identity, without knowing the model class:

* AdamW, with ``adamw_weight_decay``: the weight of every ``nn.Embedding`` (token and
  position embeddings, by module type) and the output layer's weight (by parameter
  identity, so a head tied to the token embedding is one tensor, counted once). The
  output layer (:func:`output_layer`) is ``model.get_output_embeddings()`` when the
  model has that method (Hugging Face); otherwise the last ``nn.Linear`` whose module
  is named ``head``/``lm_head``/``output`` (tfx's GPT, nanoGPT, Llama-style models; also
  a pipeline stage that holds the head but no embedding); otherwise the last
  ``nn.Linear`` whose ``out_features`` equals the vocabulary, taken as the largest
  ``nn.Embedding``'s ``num_embeddings``. (Matching *any* embedding's size is not safe:
  the default config has 256 positions and d_model=256, the size of ``o_proj``);
* AdamW without weight decay: every parameter with fewer than 2 dimensions (norms,
  biases), as :func:`tfx.optim.param_groups` does for ``optim=adamw``;
* Muon: every other trainable parameter with 2 dimensions (tfx's GPT: ``q/k/v/o_proj``
  and ``fc``/``proj`` of every block). A matrix of another rank (a conv kernel) goes to
  AdamW: ``torch.optim.Muon`` only takes 2-D tensors.

One optimizer object, :class:`MuonAdamW`, is returned, so everything that takes "the
optimizer" (the ``scheduler`` group's LambdaLR, clipping, GradScaler, the checkpoint
manager, ``torch.distributed.checkpoint.state_dict.get_state_dict``) sees one
``torch.optim.Optimizer``:

* it *is* a ``torch.optim.Optimizer`` subclass that owns every parameter group (each
  tagged ``"algorithm": "muon"|"adamw"``) and one ``state`` dict, so ``param_groups``,
  ``state``, ``state_dict``/``load_state_dict``, ``zero_grad`` and DCP's per-FQN
  optimizer state are the base class's own code;
* the update is not re-implemented: it holds a ``torch.optim.Muon`` and a
  ``torch.optim.AdamW`` whose ``param_groups`` are *the same dict objects* as its own
  groups of that algorithm and whose ``state`` is *its* ``state`` (keys are
  parameters, which never overlap). ``step()`` calls both. The scheduler's lr changes,
  GradScaler's unscaling and a checkpoint load are therefore seen by the inner
  optimizers; after ``load_state_dict`` (which replaces the group dicts and the state
  dict) the inner optimizers are re-pointed at the new ones.

The learning rate convention: ``adjust_lr_fn="match_rms_adamw"`` (Moonshot, "Muon is
Scalable for LLM Training") scales Muon's update to the RMS of a typical AdamW update,
0.2 * lr * sqrt(max(fan_out, fan_in)) * orthogonalised momentum, so ``lr`` and
``weight_decay`` mean what they mean for AdamW and one scheduler multiplier serves both
parts. ``adamw_lr``/``adamw_weight_decay`` left null take ``lr``/``weight_decay``.
(``"original"`` is Keller Jordan's scaling; it needs a ~10-20x larger ``lr``, e.g.
0.02, and then ``adamw_lr`` set separately.) Default ``lr=8e-3``: lightly tuned on the
default job (60-step runs at 4e-3, 8e-3, 1.6e-2: 5.09, 5.02, 5.02 val loss; AdamW's 1e-3
gave 5.83 and 4e-3 6.07).

Newton-Schulz precision (``ns_dtype``): torch's Muon runs its iterations in bfloat16,
right for GPUs. On a CPU without native bf16 that is ruinous: measured for one
``model=small`` layer (1 thread), 12.6 ms with AMX, 152 ms with AVX-512 and 1,596 ms with
AVX2 (``ONEDNN_MAX_CPU_ISA``), against ~40 ms in float32 on either. So ``ns_dtype=auto``
(the default) runs it in float32 on the CPU and in bfloat16 elsewhere; ``float32`` and
``bfloat16`` force one. float32 is torch's own iteration (:func:`newton_schulz_float32`)
put in place of ``torch.optim._muon._zeropower_via_newtonschulz`` only while this
optimizer's Muon part steps, because torch's Muon has no precision argument.

Exactness: the update of given gradients is deterministic, so resume is bitwise. With
a float32 Newton-Schulz, float32 round-off in the gradients (another accumulation split,
DDP's all-reduce order) stays float32 round-off in the weights; bfloat16 turns it into
~1% of an update (3% after four steps). tests/test_muon.py measures both.

Parallelism: single process, DDP (gradients are all-reduced before the step, every
rank applies the same update; sharded checkpoints go through DCP's
``get_state_dict(model, optimizer)``, which keys the one ``state`` by parameter name),
pipeline parallel (each stage holds whole matrices), and FSDP2, tensor parallel and
FSDP+TP: there the parameters, gradients and momentum buffers are DTensors, and
torch's Newton-Schulz runs on them unchanged: DTensor's sharding propagation gathers
what each matmul needs, so every rank computes the update of the whole matrix and keeps
its shard (the communication of ~3 all-gathers per iteration per matrix, the price of
Newton-Schulz needing the whole matrix; torch's Muon has no sharded variant). With a
float32 Newton-Schulz the sharded update equals one process's to float32 round-off
(tests/test_muon.py, FSDP2 and TP on 2 gloo ranks).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Tuple

import torch
import torch.optim._muon as _torch_muon
from torch import nn

from tfx.core import ConfigError
from tfx.optim import check_betas, check_range

ADJUST_LR_FNS = ("original", "match_rms_adamw")
NS_DTYPES = ("auto", "float32", "bfloat16")
HEAD_NAMES = ("head", "lm_head", "output")


# -- which parameters go where -------------------------------------------------------
def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The module that maps hidden states to the vocabulary, or None: the model's
    ``get_output_embeddings()`` (Hugging Face), else the last ``nn.Linear`` named
    ``head``/``lm_head``/``output``, else the last ``nn.Linear`` whose ``out_features``
    is the vocabulary (the largest ``nn.Embedding``'s ``num_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (AttributeError, NotImplementedError):
            out = None
        if out is not None:
            return out
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in reversed(linears):
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            return m
    rows = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    for _, m in reversed(linears):
        if rows and m.out_features == max(rows):
            return m
    return None


def split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter], List[nn.Parameter]]:
    """``(hidden matrices -> Muon, other matrices -> AdamW with decay, 1-D -> AdamW
    without decay)``, each in ``model.parameters()`` order (tied weights once)."""
    not_hidden = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = output_layer(model)
    if head is not None and getattr(head, "weight", None) is not None:
        not_hidden.add(id(head.weight))
    hidden, matrices, vectors = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            vectors.append(p)
        elif p.dim() == 2 and id(p) not in not_hidden:
            hidden.append(p)
        else:
            matrices.append(p)
    return hidden, matrices, vectors


# -- Newton-Schulz in float32 ------------------------------------------------------------
def newton_schulz_float32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's Muon orthogonalisation (``torch/optim/_muon.py``: Keller Jordan's quintic
    iteration, the same coefficients and steps) computed in float32 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _float32_newton_schulz():
    """torch's Muon calls the module-level ``_zeropower_via_newtonschulz`` at step time."""
    original = _torch_muon._zeropower_via_newtonschulz
    _torch_muon._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = original


# -- the combined optimizer ------------------------------------------------------------
class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over Muon groups and AdamW groups (see the module docstring).

    ``groups``: param-group dicts, each with ``"algorithm"`` set to ``"muon"`` or
    ``"adamw"``; ``muon_defaults``/``adamw_defaults``: the inner optimizers' arguments."""

    ALGORITHMS = ("muon", "adamw")

    def __init__(self, groups: List[dict], muon_defaults: dict, adamw_defaults: dict,
                 ns_dtype: str = "auto") -> None:
        if ns_dtype not in NS_DTYPES:
            raise ConfigError(f"optim.ns_dtype={ns_dtype!r}; choose one of {list(NS_DTYPES)}")
        if not hasattr(_torch_muon, "_zeropower_via_newtonschulz"):  # pragma: no cover
            raise ConfigError("optim=muon: this torch has no torch.optim._muon._zeropower_via_newtonschulz "
                              "(tfx runs it in float32 on CPUs); use the torch in requirements.txt")
        self.ns_dtype = ns_dtype
        groups = [g for g in groups if len(g["params"])]
        if not groups:
            raise ConfigError("optim=muon: the model has no trainable parameters")
        by_algo = {a: [g for g in groups if g["algorithm"] == a] for a in self.ALGORITHMS}
        if len(groups) != sum(map(len, by_algo.values())):
            raise ValueError(f"every group needs 'algorithm' in {self.ALGORITHMS}")
        # The inner optimizers validate their arguments and fill each group's defaults;
        # this optimizer then adopts those very group dicts.
        self._inner = {}
        if by_algo["muon"]:
            self._inner["muon"] = torch.optim.Muon(by_algo["muon"], **muon_defaults)
        if by_algo["adamw"]:
            self._inner["adamw"] = torch.optim.AdamW(by_algo["adamw"], **adamw_defaults)
        adopted = [g for a in self.ALGORITHMS if a in self._inner for g in self._inner[a].param_groups]
        super().__init__(adopted, defaults={"muon": dict(muon_defaults), "adamw": dict(adamw_defaults)})
        self._ready = True
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state."""
        for algo, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g.get("algorithm") == algo]
            inner.state = self.state
        linked = sum(len(inner.param_groups) for inner in self._inner.values())
        if linked != len(self.param_groups):
            raise ValueError(f"MuonAdamW: every param group needs 'algorithm' in {list(self._inner)}")

    def add_param_group(self, param_group: dict) -> None:
        ready = getattr(self, "_ready", False)
        if ready:  # after construction: fill in that algorithm's defaults
            algo = param_group.get("algorithm")
            if algo not in self._inner:
                raise ValueError(f"MuonAdamW.add_param_group: 'algorithm' must be one of {list(self._inner)}")
            for key, value in self._inner[algo].defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        if ready:
            self._link()

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [g.get("algorithm") for g in state_dict["param_groups"]]
        mine = [g["algorithm"] for g in self.param_groups]
        if saved != mine:
            raise ValueError(f"optimizer state has param groups {saved}, this optimizer {mine} "
                             f"(saved by another optimizer or another model)")
        super().load_state_dict(state_dict)  # replaces the group dicts and the state dict
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for algo, inner in self._inner.items():
            with _float32_newton_schulz() if algo == "muon" and self._float32() else contextlib.nullcontext():
                inner.step()
        return loss

    def _float32(self) -> bool:
        """Newton-Schulz in float32: ``ns_dtype=float32``, or ``auto`` on the CPU."""
        if self.ns_dtype != "auto":
            return self.ns_dtype == "float32"
        devices = {p.device.type for g in self._inner["muon"].param_groups for p in g["params"]}
        return devices <= {"cpu", "meta"}


# -- the ``optim`` group's factory -----------------------------------------------------
def muon(model: nn.Module, lr: float = 8e-3, momentum: float = 0.95, nesterov: bool = True,
         ns_steps: int = 5, weight_decay: float = 0.1, adjust_lr_fn: str = "match_rms_adamw",
         adamw_lr: Optional[float] = None, adamw_betas: Iterable[float] = (0.9, 0.95),
         adamw_eps: float = 1e-8, adamw_weight_decay: Optional[float] = None,
         ns_dtype: str = "auto") -> MuonAdamW:
    """Muon on the hidden matrices, AdamW on the rest (``conf/optim/muon.yaml``)."""
    check_range("lr", lr, 0, low_open=True)
    check_range("weight_decay", weight_decay, 0)
    for key, value in (("adamw_lr", adamw_lr), ("adamw_weight_decay", adamw_weight_decay)):
        if value is not None:  # null: the Muon part's value
            check_range(key, value, 0, low_open=key == "adamw_lr")
    adamw_lr = lr if adamw_lr is None else adamw_lr
    adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    check_range("momentum", momentum, 0, 1)
    check_range("ns_steps", ns_steps, 1, 100, integer=True)
    if not isinstance(nesterov, bool):
        raise ConfigError(f"optim.nesterov={nesterov!r} must be true or false")
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ConfigError(f"optim.adjust_lr_fn={adjust_lr_fn!r}; choose one of {list(ADJUST_LR_FNS)}")
    betas = check_betas("adamw_betas", adamw_betas)
    check_range("adamw_eps", adamw_eps, 0, low_open=True)

    hidden, matrices, vectors = split_parameters(model)
    groups = [{"params": hidden, "algorithm": "muon", "lr": lr, "weight_decay": weight_decay},
              {"params": matrices, "algorithm": "adamw", "lr": adamw_lr, "weight_decay": adamw_weight_decay},
              {"params": vectors, "algorithm": "adamw", "lr": adamw_lr, "weight_decay": 0.0}]
    return MuonAdamW(
        groups,
        muon_defaults=dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                           ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn),
        adamw_defaults=dict(lr=adamw_lr, betas=betas, eps=adamw_eps, weight_decay=adamw_weight_decay),
        ns_dtype=ns_dtype)
