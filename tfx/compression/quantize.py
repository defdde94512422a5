"""Post-training quantization and QAT through torchao's ``quantize_``.

Only the block Linears are quantized (see ``block_linears``: tfx's GPT, HF Llama's
q/k/v/o and gate/up/down, HF GPT-2's c_attn/c_proj/c_fc): the head shares its weight
with the embedding, and quantizing one would untie them. torchao swaps ``nn.Linear``
only, so GPT-2's ``Conv1D`` projections (a Linear with a transposed weight) are first
replaced by equal ``nn.Linear`` modules (:func:`tfx.compression._common.conv1d_to_linear`).

Schemes (``quantize_model(model, scheme)``):

================== ============================================ ==========================
int8_dynamic       int8 weights per channel, activations        CPU and CUDA; the one that
                   quantized per token at run time              is faster on CPU (compile)
int8_weight_only   int8 weights, fp matmul after dequant        memory only; no CPU speedup
int4_weight_only   int4 groups (tinygemm / mslk kernels)        CUDA only in torchao 0.18
================== ============================================ ==========================
"""
from __future__ import annotations

import copy
import math
import os
from functools import reduce
from typing import Dict, Optional

import torch
from torch import nn

from tfx.compression._common import block_linears, conv1d_to_linear, refuse_layouts, strip_wrappers
from tfx.compression.prune import make_permanent
from tfx.core.context import RunContext
from tfx.core.errors import ConfigError, TfxError
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.anatomy import require_anatomy, spec_block_linears, spec_family
from tfx.model.size import count_params, state_dict_bytes

SCHEMES = ("int8_dynamic", "int8_weight_only", "int4_weight_only")
QAT_SCHEMES = ("int8", "int8a_int4w")


def _block_filter(model: nn.Module):
    """A torchao ``filter_fn`` that selects the current block Linears of ``model``."""
    targets = {id(m) for _, m in block_linears(model) if isinstance(m, nn.Linear)}
    return lambda mod, fqn: id(mod) in targets


def check_group_size(plan: Plan, option: str, group_size: int) -> None:
    """Refuse, in ``validate``, a quantization group that does not divide the input
    width of every block Linear of the model ``plan.model`` builds."""
    shapes = spec_block_linears(getattr(plan, "model", None)) or []
    for name, fan_in, _ in shapes:
        if fan_in % group_size:
            widths = sorted({i for _, i, _ in shapes})
            raise ConfigError(f"{option}.group_size={group_size} does not divide in_features={fan_in} "
                              f"of {name} ({spec_family(plan.model)}); weights are quantized in groups "
                              f"of group_size consecutive inputs, so it must divide every block "
                              f"Linear's input width ({widths}): choose a divisor of "
                              f"{reduce(math.gcd, widths)}")


INT4_GROUP_SIZES = (32, 64, 128, 256)


def ptq_config(scheme: str, group_size: int = 32):
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig)

    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=group_size)
    raise ConfigError(f"compression.ptq.scheme={scheme!r}; choose one of {', '.join(SCHEMES)}")


def check_supported(scheme: str, device_type: str) -> None:
    """Fail before training for schemes torchao cannot run on this device."""
    if scheme == "int4_weight_only" and device_type != "cuda":
        raise ConfigError(
            f"compression.ptq.scheme=int4_weight_only is not supported on {device_type} by "
            "torchao's Int4WeightOnlyConfig (CUDA kernels only); use int8_dynamic or "
            "int8_weight_only, or run on a CUDA GPU")


def quantize_model(model: nn.Module, scheme: str, group_size: int = 32) -> nn.Module:
    """Quantize ``model``'s block Linears in place with torchao; returns the model.
    GPT-2's ``Conv1D`` projections become equal ``nn.Linear`` modules first."""
    from torchao.quantization import quantize_

    config = ptq_config(scheme, group_size)
    device_type = next(model.parameters()).device.type
    check_supported(scheme, device_type)
    conv1d_to_linear(model)
    try:
        quantize_(model, config, filter_fn=_block_filter(model))
    except (ImportError, NotImplementedError, RuntimeError) as err:
        raise TfxError(f"torchao cannot apply {scheme} on {device_type}: {err}") from err
    return model


def save_quantized(model: nn.Module, path) -> int:
    """``torch.save`` the quantized state_dict (torchao tensors pickle themselves);
    returns the file size in bytes."""
    tmp = f"{path}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deepcopy of the model as the build order builds it (DDP / compile wrappers
    removed, tfx's HF wrapper kept: exported keys then fit a freshly built model) with
    pruning masks folded in."""
    return make_permanent(copy.deepcopy(strip_wrappers(model))).eval()


class PostTrainingQuant(Technique):
    """Quantize a copy of the trained model at export; training is untouched.

    Writes ``model_<scheme>.pt`` (a torchao state_dict, loadable with
    ``torch.load(weights_only=False)`` into a model quantized the same way) and
    reports its size next to the fp32 one.
    """

    name = "ptq"
    stage = Stage.SURGERY

    def __init__(self, scheme: str = "int8_dynamic", group_size: int = 32) -> None:
        ptq_config(scheme, group_size)  # validates the name
        if group_size not in INT4_GROUP_SIZES:  # torchao's int4 kernels take these only
            raise ConfigError(f"compression.ptq.group_size={group_size} must be one of "
                              f"{list(INT4_GROUP_SIZES)}")
        self.scheme, self.group_size = scheme, group_size

    def validate(self, plan: Plan) -> None:
        require_anatomy(plan, "compression=ptq")
        refuse_layouts(plan, "compression=ptq", "quantizes a copy of the whole model at export")
        check_supported(self.scheme, plan.device_type)
        if self.scheme == "int4_weight_only":
            check_group_size(plan, "compression.ptq", self.group_size)

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        q = quantize_model(_plain_copy(model), self.scheme, self.group_size)
        size = save_quantized(q, os.path.join(out_dir, f"model_{self.scheme}.pt"))
        dense = state_dict_bytes(_plain_copy(model))
        return {f"ptq/{self.scheme}/bytes": size, f"ptq/{self.scheme}/size_ratio": size / dense}


def qat_config(scheme: str, group_size: int = 32):
    """(prepare config, convert config, PTQ config applied after convert or None).

    ``int8a_int4w`` uses torchao's base-config path (int8 per-token activations, int4
    grouped weights; converted by torchao itself). torchao cannot infer fake-quant
    settings from ``Int8DynamicActivationInt8WeightConfig``, so ``int8`` spells them
    out (per-token int8 activations, symmetric per-channel int8 weights) and converts
    by stripping the fake quantizers and applying that PTQ config. The activation
    fake-quant is asymmetric because torchao 0.18 has no symmetric per-token fake
    quantizer, while the int8 kernel quantizes activations symmetrically: a small
    train/inference mismatch on activations only (weights match exactly).
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if scheme == "int8a_int4w":
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(group_size))
        return QATConfig(base, step="prepare"), QATConfig(base, step="convert"), None
    if scheme == "int8":
        act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        return (QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                QATConfig(step="convert"), Int8DynamicActivationInt8WeightConfig())
    raise ConfigError(f"compression.qat.scheme={scheme!r}; choose one of {', '.join(QAT_SCHEMES)}")


def prepare_qat(model: nn.Module, scheme: str = "int8", group_size: int = 32) -> nn.Module:
    """Swap block Linears for torchao ``FakeQuantizedLinear`` (same state_dict keys)."""
    from torchao.quantization import quantize_

    prepare, _, _ = qat_config(scheme, group_size)
    quantize_(model, prepare, filter_fn=_block_filter(model))
    return model


def convert_qat(model: nn.Module, scheme: str = "int8", group_size: int = 32) -> nn.Module:
    """Turn a QAT-prepared model into a really quantized one (in place)."""
    from torchao.quantization import quantize_

    _, convert, ptq = qat_config(scheme, group_size)
    quantize_(model, convert, filter_fn=_block_filter(model))
    if ptq is not None:
        quantize_(model, ptq, filter_fn=_block_filter(model))
    return model


class QAT(Technique):
    """Fake-quantize the block Linears during training (SURGERY, before the optimizer);
    export converts a copy to the real quantized model, ``model_qat_<scheme>.pt``.

    The usual recipe is ``from_checkpoint: <trained run>`` (or a pretrained HF model)
    and a short fine-tune; without either the model trains with fake quantization from
    scratch. ``FakeQuantizedLinear`` keeps the Linear's state-dict keys, so an HF Llama's
    ``hf_model/`` holds the trained float weights. Refused on GPT-2 (``validate``):
    torchao swaps ``nn.Linear`` only, and turning its ``Conv1D`` into Linears would change
    the trained model's parameter layout for good.
    """

    name = "qat"
    stage = Stage.SURGERY

    def __init__(self, scheme: str = "int8", group_size: int = 32,
                 from_checkpoint: Optional[str] = None) -> None:
        if scheme not in QAT_SCHEMES:
            raise ConfigError(f"compression.qat.scheme={scheme!r}; choose one of {', '.join(QAT_SCHEMES)}")
        if group_size < 1:
            raise ConfigError(f"compression.qat.group_size={group_size} must be >= 1 (and divide "
                              f"the Linear input widths)")
        # from_checkpoint: loaded by the build order before SURGERY (not on a resume)
        self.scheme, self.group_size, self.from_checkpoint = scheme, group_size, from_checkpoint

    def validate(self, plan: Plan) -> None:
        if require_anatomy(plan, "compression=qat") == "hf_gpt2":
            raise ConfigError("compression=qat swaps nn.Linear layers for torchao's fake-quantized "
                              "ones, and GPT-2's projections are transformers Conv1D (weight stored "
                              "[in, out]); turning them into Linears would change the trained model's "
                              "parameter layout, so it could not be saved for transformers again. On "
                              "GPT-2 use compression=ptq (a converted copy at export) or gptq")
        refuse_layouts(plan, "compression=qat", "swaps whole nn.Linear layers for torchao's "
                       "fake-quantized ones and exports a copy of the whole model")
        if self.scheme == "int8a_int4w":
            check_group_size(plan, "compression.qat", self.group_size)

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return prepare_qat(model, self.scheme, self.group_size)

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        fq = copy.deepcopy(strip_wrappers(model)).eval()
        q = convert_qat(fq, self.scheme, self.group_size)
        size = save_quantized(q, os.path.join(out_dir, f"model_qat_{self.scheme}.pt"))
        return {f"qat/{self.scheme}/bytes": size, "qat/params": count_params(model)}
