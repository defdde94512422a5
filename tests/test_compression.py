"""Compression: pruning, sparse storage, quantization, distillation, low-rank, exports.

Tiny models and a synthetic next-token task (x -> x + 1 mod V) keep this file fast.
"""
import copy
import dataclasses
import math
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from hydra.utils import instantiate
from torch import nn
from torch.nn.utils import prune

from tfx.compression import (CompressedExport, Distillation, LowRank, MagnitudePruning, NMPruning,
                             PostTrainingQuant, QAT, StructuredPruning, apply_lowrank, cubic_sparsity,
                             factorize, kd_loss_sum, load_compressed, load_compressed_state,
                             load_sparse, magnitude_prune, make_permanent, quantize_model, save_compressed,
                             save_sparse, sparsity)
from tfx.compression._common import block_linears, pruned_state_dict
from tfx.compression.distill import check_vocab
from tfx.compression.prune import to_semi_structured
from tfx.compression.structured import _head_rows, select_units, shrink
from tfx.core import ConfigError, Pipeline, Plan, RunContext, StepInfo
from tfx.model import GPT, GPTConfig

CTX = RunContext()
CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "compression")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def batch(step, b=8, t=16, vocab=64):
    g = torch.Generator().manual_seed(step % 4)
    start = torch.randint(0, vocab, (b, 1), generator=g)
    seq = (start + torch.arange(t + 1)) % vocab
    return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}


def train(model, techniques, steps=12, lr=1e-2, ctx=CTX, resume=None):
    """The trainer's hook order, in miniature; returns (model, pipeline, optimizer, losses).

    ``resume``: a checkpoint dict; like tfx.train.build.build, the techniques rebuild the
    recorded structure (``ctx.resuming``), then model, optimizer and technique states
    are loaded once."""
    pipe = Pipeline(techniques)
    if resume is not None:
        ctx = dataclasses.replace(ctx, resuming=True, structure=resume["structure"])
    model = pipe.apply_to_model(model, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        pipe.load_state_dict(resume["techniques"])
        return model, pipe, opt, []
    return model, pipe, opt, run_steps(model, pipe, opt, 0, steps, ctx)


def checkpoint(model, pipe, opt):
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "techniques": pipe.state_dict(), "structure": pipe.structure()})


def run_steps(model, pipe, opt, first, last, ctx=CTX):
    hidden = any(getattr(t, "needs_hidden", False) for t in pipe.techniques)
    losses = []
    for step in range(first, last):
        b, info = batch(step), StepInfo(step=step)
        with pipe.step_context(model, info, ctx):
            logits, h = model(b["input_ids"], return_hidden=True)
            ce_sum = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
            out = {"logits": logits, "ce_sum": ce_sum, "norm": b["labels"].numel()}
            if hidden:
                out["hidden"] = h
            loss = pipe.transform_loss(ce_sum / out["norm"], b, out, info, ctx)
        pipe.scale_loss(loss).backward()
        pipe.before_optimizer_step(model, opt, info, ctx)
        pipe.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        pipe.after_optimizer_step(model, StepInfo(step=step + 1), ctx)
        losses.append((ce_sum / out["norm"]).item())
    return losses


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box the thread
    pool's spinning makes them ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained():
    """A tiny model with realistic (trained) weights."""
    model, *_ = train(tiny(), [], steps=40)
    return model.eval()


# -- unstructured pruning ---------------------------------------------------------------
def test_cubic_schedule_endpoints():
    assert cubic_sparsity(10, 0.8, 10, 50, 10) == pytest.approx(0.0)
    assert cubic_sparsity(50, 0.8, 10, 50, 10) == pytest.approx(0.8)
    assert cubic_sparsity(30, 0.8, 10, 50, 10) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(25, 0.8, 10, 50, 10) is None  # between points
    assert cubic_sparsity(60, 0.8, 10, 50, 10) is None  # after the end


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_pruning_hits_target_at_every_point(scope):
    tech = MagnitudePruning(sparsity=0.8, scope=scope, schedule="cubic", start_step=2,
                            end_step=8, frequency=2)
    model, pipe, opt, _ = train(tiny(), [tech], steps=0)
    n = sum(m.weight.numel() for _, m in block_linears(model))
    for step in range(10):
        run_steps(model, pipe, opt, step, step + 1)
        target = tech.target_at(step + 1)
        if target is not None:
            # per layer, each layer rounds to a whole weight
            assert sparsity(model) == pytest.approx(target, abs=len(block_linears(model)) / n)
    assert sparsity(model) == pytest.approx(0.8, abs=1e-3)
    # masks hold through optimizer steps: pruned weights stay exactly zero
    for _, m in block_linears(model):
        assert torch.all(m.weight[m.weight_mask == 0] == 0)


def test_pruning_resume_matches_uninterrupted():
    mk = lambda: MagnitudePruning(sparsity=0.7, schedule="cubic", start_step=0, end_step=8, frequency=2)
    ref_model, ref_pipe, ref_opt, _ = train(tiny(), [mk()], steps=5)
    ckpt = checkpoint(ref_model, ref_pipe, ref_opt)
    run_steps(ref_model, ref_pipe, ref_opt, 5, 10)
    # resume: fresh model, re-apply the technique, then load model, optimizer and technique state
    model, pipe, opt, _ = train(tiny(seed=1), [mk()], resume=ckpt)
    assert pipe.techniques[0].current == pytest.approx(ckpt["techniques"]["prune"]["current_sparsity"])
    run_steps(model, pipe, opt, 5, 10)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3)


def test_oneshot_layer_pruning_and_make_permanent(trained):
    model = copy.deepcopy(trained)
    magnitude_prune(model, 0.5, scope="layer")
    for _, m in block_linears(model):
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    make_permanent(model)
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_pruning_hooks_train(tmp_path):
    tech = MagnitudePruning(sparsity=0.5, schedule="cubic", start_step=0, end_step=6, frequency=2)
    model, _, _, losses = train(tiny(), [tech], steps=12)
    assert losses[-1] < losses[0]
    metrics = tech.export(model, tmp_path, CTX)
    assert metrics["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["prune/size_ratio"] < 0.7 and (tmp_path / "model_sparse.tfxs").exists()  # embeddings stay dense


# -- N:M -------------------------------------------------------------------------------
def test_nm_masks_are_2_of_4_and_train(tmp_path):
    tech = NMPruning(n=2, m=4)
    model, _, _, losses = train(tiny(), [tech], steps=10)
    for _, m in block_linears(model):
        assert (m.weight.reshape(-1, 4) != 0).sum(1).max() <= 2
    assert losses[-1] < losses[0]
    metrics = tech.export(model, tmp_path, CTX)
    assert metrics["nm/sparsity"] == pytest.approx(0.5)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 semi-structured kernels need CUDA sm80+")
def test_semi_structured_matches_masked_on_cuda():
    model = tiny().cuda().half().eval()
    from tfx.compression import nm_prune
    nm_prune(model)
    x = torch.randint(0, 64, (4, 32), device="cuda")
    ref = model(x)
    sparse = to_semi_structured(copy.deepcopy(model))
    torch.testing.assert_close(sparse(x), ref, atol=1e-2, rtol=1e-2)


# -- structured pruning ------------------------------------------------------------------
def _masked_equivalent(model, keep):
    """Same network, removed heads/neurons zeroed through prune masks instead of sliced."""
    for name, block in model.layers.items():
        attn, mlp, hd = block.attn, block.mlp, block.attn.head_dim
        rows = torch.zeros(attn.q_proj.out_features)
        rows[_head_rows(keep[name]["heads"], hd)] = 1
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            prune.custom_from_mask(lin, "weight", rows[:, None].expand_as(lin.weight))
        prune.custom_from_mask(attn.o_proj, "weight", rows[None, :].expand_as(attn.o_proj.weight))
        neurons = torch.zeros(mlp.fc.out_features)
        neurons[keep[name]["neurons"]] = 1
        prune.custom_from_mask(mlp.fc, "weight", neurons[:, None].expand_as(mlp.fc.weight))
        prune.custom_from_mask(mlp.proj, "weight", neurons[None, :].expand_as(mlp.proj.weight))
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_structured_equals_masked_and_reloads(trained, bias):
    base = copy.deepcopy(trained) if not bias else tiny(bias=True, n_head=4)
    keep = select_units(base, head_ratio=0.5, neuron_ratio=0.5)
    small = shrink(copy.deepcopy(base), keep)
    masked = _masked_equivalent(copy.deepcopy(base), keep)
    x = batch(0)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), atol=1e-5, rtol=1e-5)
        assert small.num_params() < base.num_params()
        fresh = load_compressed_state(tiny(seed=3, bias=bias, n_head=base.cfg.n_head), small.state_dict())
        torch.testing.assert_close(fresh(x), small(x))


def test_structured_technique_trains_and_resumes():
    tech = StructuredPruning(head_ratio=0.5, neuron_ratio=0.25)
    model, pipe, opt, losses = train(tiny(), [tech], steps=10)
    assert losses[-1] < losses[0]
    assert tech.shapes["0"] == {"heads": 1, "d_ff": 96}
    # resume: the saved shapes rebuild a fresh model, so the checkpoint loads (strictly)
    again, *_ = train(tiny(seed=5), [StructuredPruning(head_ratio=0.5, neuron_ratio=0.25)],
                      resume=checkpoint(model, pipe, opt))
    x = batch(0)["input_ids"]
    torch.testing.assert_close(again(x), model(x))


# -- sparse storage -------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.5, 0.9])
def test_sparse_file_round_trip_and_size_bound(trained, tmp_path, s):
    model = copy.deepcopy(trained)
    magnitude_prune(model, s, scope="global")
    path = tmp_path / "m.tfxs"
    info = save_sparse(model, path)
    loaded = load_sparse(path)
    ref = pruned_state_dict(model.state_dict())
    assert loaded.keys() == ref.keys()
    for k in ref:
        assert torch.equal(loaded[k], ref[k]), k
    # the exact size: header + per bitmask tensor ceil(N/8) + 4 nnz, per dense tensor 4 N
    pruned = {f"{n}.weight" for n, _ in block_linears(model)}
    seen, expect, prunable = set(), info["header_bytes"], 0
    for k, t in ref.items():
        if t.untyped_storage().data_ptr() in seen:
            continue  # tied head == embedding, stored once
        seen.add(t.untyped_storage().data_ptr())
        if k in pruned:
            expect += (t.numel() + 7) // 8 + 4 * int((t != 0).sum())
            prunable += 4 * t.numel()
        else:
            expect += 4 * t.numel()
    assert info["bytes"] == os.path.getsize(path) == expect
    # hence, for the pruned weights: (1 - s + 1/32) of dense plus <= 1 byte per tensor
    weights_part = expect - info["header_bytes"] - (info["dense_bytes"] - prunable)
    assert weights_part <= (1 - s + 1 / 32) * prunable + len(pruned) + 4
    model2 = tiny(seed=9)
    model2.load_state_dict(loaded)


# -- quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,tol", [("int8_dynamic", 0.05), ("int8_weight_only", 0.05)])
def test_ptq_logits_close_to_fp32(trained, scheme, tol):
    x = batch(1)["input_ids"]
    with torch.no_grad():
        ref = trained(x)
        out = quantize_model(copy.deepcopy(trained), scheme)(x)
    assert (out - ref).abs().max() / ref.abs().max() < tol
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_int4_weight_only_is_a_clear_error_on_cpu(trained):
    with pytest.raises(ConfigError, match="int4_weight_only is not supported on cpu"):
        quantize_model(copy.deepcopy(trained), "int4_weight_only")
    with pytest.raises(ConfigError, match="choose one of"):
        PostTrainingQuant(scheme="int3")


def test_ptq_export_writes_smaller_file(trained, tmp_path):
    metrics = PostTrainingQuant("int8_dynamic").export(trained, tmp_path, CTX)
    assert os.path.exists(tmp_path / "model_int8_dynamic.pt")
    assert metrics["ptq/int8_dynamic/size_ratio"] < 0.8


@pytest.mark.parametrize("scheme", ["int8", "int8a_int4w"])
def test_qat_trains_and_converts(tmp_path, scheme):
    tech = QAT(scheme=scheme)
    model, _, _, losses = train(tiny(), [tech], steps=12)
    assert losses[-1] < losses[0]
    assert "FakeQuantized" in type(model.layers["0"].mlp.fc).__name__
    metrics = tech.export(model, tmp_path, CTX)
    assert os.path.exists(tmp_path / f"model_qat_{scheme}.pt") and metrics[f"qat/{scheme}/bytes"] > 0


# -- distillation ------------------------------------------------------------------------
def test_kd_loss_gradient_matches_reference():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 64, dtype=torch.float64)
    y = torch.randint(0, 64, (2, 5))
    alpha, T, norm = 0.3, 2.5, 10
    mask = torch.ones(2, 5, dtype=torch.float64)
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), reduction="sum") / norm
    got = (1 - alpha) * ce + alpha * kd_loss_sum(s, t, T, mask) / norm
    (g_got,) = torch.autograd.grad(got, s)
    # reference written out: KL(p_t || p_s) = sum p_t (log p_t - log p_s), softmax by hand
    s2 = s.detach().clone().requires_grad_(True)
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    log_p_s = s2 / T - torch.log(torch.exp(s2 / T).sum(-1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum()
    log_q = s2 - torch.log(torch.exp(s2).sum(-1, keepdim=True))
    ce_ref = -log_q.gather(-1, y[..., None]).sum() / norm
    ref = (1 - alpha) * ce_ref + alpha * T ** 2 * kl / norm
    (g_ref,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    # and the closed form of the KD part: alpha * T * (p_s - p_t) / norm
    p_s = torch.softmax(s.detach() / T, -1)
    onehot = F.one_hot(y, 64).double()
    closed = (1 - alpha) * (torch.softmax(s.detach(), -1) - onehot) / norm + alpha * T * (p_s - p_t) / norm
    torch.testing.assert_close(g_got, closed)


def test_distillation_trains_with_hidden_matching():
    teacher, *_ = train(tiny(seed=7, d_model=64, n_head=4), [], steps=20)
    tech = Distillation(teacher=teacher, alpha=0.7, temperature=2.0, hidden_weight=0.5)
    model, _, opt, losses = train(tiny(), [tech], steps=12)
    assert losses[-1] < losses[0]
    assert model.distill_proj.weight.shape == (64, 32)
    assert any(p is model.distill_proj.weight for g in opt.param_groups for p in g["params"])
    assert not any(p.requires_grad for p in tech.teacher.parameters())
    assert "teacher" not in dict(model.named_modules())
    assert not tech.teacher.training


def test_distillation_vocab_and_tokenizer_mismatch_is_config_error():
    teacher = tiny(vocab_size=80)
    with pytest.raises(ConfigError, match="vocab_size=80"):
        Distillation(teacher=teacher).apply_to_model(tiny(), CTX)
    with pytest.raises(ConfigError, match="tokenizer"):
        check_vocab(64, 64, "bpe:pydocs:4096", "bpe:shakespeare:4096")
    with pytest.raises(ConfigError, match="teacher is required"):
        Distillation().validate(Plan([]))


# -- low-rank -----------------------------------------------------------------------------
def test_full_rank_svd_reproduces_outputs(trained):
    x = batch(2)["input_ids"]
    model = copy.deepcopy(trained)
    ranks = apply_lowrank(model, rank_ratio=1.0)
    assert set(ranks.values()) == {32}
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), atol=1e-5, rtol=1e-5)
    lin = nn.Linear(24, 40, bias=True)
    x = torch.randn(3, 24)
    with torch.no_grad():  # a non-square layer with bias, rank = min(in, out)
        torch.testing.assert_close(factorize(lin, rank=24)(x), lin(x), atol=1e-6, rtol=1e-5)


def test_lowrank_energy_and_technique(trained):
    model = copy.deepcopy(trained)
    ranks = apply_lowrank(model, energy=0.9)
    assert all(0 < r <= 32 for r in ranks.values())
    fresh = load_compressed_state(tiny(seed=4), model.state_dict())  # ranks read from shapes
    x = batch(3)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    tech = LowRank(energy=0.8, rank_ratio=None)
    model, pipe, opt, losses = train(tiny(), [tech], steps=12)
    assert losses[-1] < losses[0] and tech.params_after < tech.params_before
    again, *_ = train(tiny(seed=6), [LowRank(energy=0.8, rank_ratio=None)],
                      resume=checkpoint(model, pipe, opt))  # weight-dependent ranks rebuilt
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(ConfigError):
        LowRank(rank_ratio=0.5, energy=0.9)


# -- compressed export ---------------------------------------------------------------------
def test_compressed_export_round_trip(trained, tmp_path):
    sd = trained.state_dict()
    info = save_compressed(sd, tmp_path / "m.tfxz", dtype=torch.bfloat16, zstd_level=3)
    back = load_compressed(tmp_path / "m.tfxz")
    for k in sd:
        assert torch.equal(back[k], sd[k].to(torch.bfloat16)), k
    assert back["head.weight"].data_ptr() == back["tok_emb.weight"].data_ptr()  # still tied
    assert info["size_ratio"] < 0.55
    info = save_compressed(sd, tmp_path / "m32.tfxz", dtype=None, zstd_level=None)
    assert all(torch.equal(load_compressed(tmp_path / "m32.tfxz")[k], sd[k]) for k in sd)
    metrics = CompressedExport(dtype="bf16", zstd_level=3).export(trained, tmp_path, CTX)
    assert metrics["compressed_export/size_ratio"] < 0.55


# -- config files ------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONF, "*.yaml"))))
def test_every_compression_yaml_instantiates(path):
    name = os.path.basename(path)[:-5]
    if name == "none":
        return
    first = open(path).readline().strip()
    assert first == f"# @package compression.{name}"
    cfg = OmegaConf.load(path)
    if name == "distill":
        assert cfg.teacher is None  # required, checked by validate()
    tech = instantiate(cfg)
    assert tech.key == name


# -- through the real trainer (tiny model, pydocs data, a few steps) -----------------------
TRAINER_OPTIONS = {
    "prune": ["compression.prune.sparsity=0.6", "compression.prune.end_step=4",
              "compression.prune.frequency=2"],
    "structured": ["compression.structured.head_ratio=0.5"],
    "nm": [], "ptq": [], "qat": [], "lowrank": [], "compressed_export": [],
}


def _trainer_cfg(*overrides):
    from conftest import tiny as tiny_cfg

    return tiny_cfg(*overrides)


@pytest.mark.parametrize("option", sorted(TRAINER_OPTIONS))
def test_option_trains_exports_and_reloads(option, tmp_path, pydocs_data):
    from tfx.ckpt import load_run
    from tfx.evaluation import evaluate_lm
    from tfx.train.run import train as run_train

    cfg = _trainer_cfg(f"compression=[{option}]", *TRAINER_OPTIONS[option])
    summary = run_train(cfg, tmp_path, data=pydocs_data)
    assert math.isfinite(summary["val_loss"])
    assert any(k.startswith(f"{option}/") or k.startswith(f"{option}.") for k in summary), summary.keys()
    model, _ = load_run(tmp_path)  # techniques re-applied from their saved state
    again = evaluate_lm(model, pydocs_data.val, 4, torch.device("cpu"),
                        max_batches=cfg.trainer.final_eval_batches)
    assert again["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


def test_distillation_through_trainer_and_reload(tmp_path, pydocs_data):
    from tfx.ckpt import load_run
    from tfx.train.run import train as run_train

    student_d = _trainer_cfg().model.d_model
    run_train(_trainer_cfg(f"model.d_model={2 * student_d}", "model.n_head=4"), tmp_path / "teacher",
              data=pydocs_data)
    cfg = _trainer_cfg("compression=[distill]", f"compression.distill.teacher={tmp_path / 'teacher'}",
                       "compression.distill.hidden_weight=0.5")
    summary = run_train(cfg, tmp_path / "student", data=pydocs_data)
    assert math.isfinite(summary["val_loss"])
    model, _ = load_run(tmp_path / "student")  # rebuilds distill_proj; the teacher is not loaded
    assert model.distill_proj.weight.shape == (2 * student_d, student_d)
    bad = _trainer_cfg("compression=[distill]", f"compression.distill.teacher={tmp_path / 'teacher'}",
                       "data.tokenizer.vocab_size=300")
    with pytest.raises(ConfigError, match="tokenizer|vocab"):
        run_train(bad, tmp_path / "bad")


def test_pruning_resume_through_trainer_matches_uninterrupted(tmp_path, pydocs_data):
    from tfx.train.run import build

    over = ["compression=[prune]", "compression.prune.sparsity=0.7", "compression.prune.end_step=6",
            "compression.prune.frequency=2", "trainer.max_steps=8"]
    ref = build(_trainer_cfg(*over), tmp_path / "ref", data=pydocs_data)
    ref.trainer.fit()
    first = build(_trainer_cfg(*over), tmp_path / "cut", data=pydocs_data)
    first.trainer.callbacks.append(lambda t: t.request_stop("test") if t.state.step == 3 else None)
    first.trainer.fit()
    resumed = build(_trainer_cfg(*over), tmp_path / "cut", data=pydocs_data)
    assert resumed.trainer.state.step == 3
    resumed.trainer.fit()
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert sparsity(resumed.model) == pytest.approx(0.7, abs=1e-3)


FROM_CHECKPOINT = {  # options that keep the function, so outputs must match the source run
    "prune": (["compression.prune.sparsity=0.5"], 1e-6),
    "structured": (["compression.structured.head_ratio=0.0", "compression.structured.neuron_ratio=0.0"], 1e-6),
    "lowrank": (["compression.lowrank.rank_ratio=1.0"], 1e-4),
    "qat": ([], 0.1),
    "nm": ([], None),
}


@pytest.mark.parametrize("option", sorted(FROM_CHECKPOINT))
def test_from_checkpoint_starts_from_the_trained_weights(option, tmp_path, pydocs_data):
    from tfx.ckpt import load_run
    from tfx.train.run import build, train as run_train

    run_train(_trainer_cfg("trainer.max_steps=2"), tmp_path / "src", data=pydocs_data)
    src, _ = load_run(tmp_path / "src")
    overrides, tol = FROM_CHECKPOINT[option]
    job = build(_trainer_cfg(f"compression=[{option}]", f"compression.{option}.from_checkpoint={tmp_path / 'src'}",
                             *overrides), tmp_path / "dst", data=pydocs_data)
    if tol is None:  # N:M changes the function; its dense weights must be the source's
        torch.testing.assert_close(job.model.layers["0"].mlp.fc.weight_orig, src.layers["0"].mlp.fc.weight)
        return
    x = torch.randint(0, src.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(job.model.eval()(x), src(x), atol=tol, rtol=tol)


def test_two_mask_techniques_are_rejected():
    techs = [MagnitudePruning(), NMPruning()]
    with pytest.raises(ConfigError, match="choose one"):
        Pipeline(techs).validate(Plan(techs))
