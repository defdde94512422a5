"""optim=muon: Muon on the hidden matrices, AdamW on the rest, as one optimizer that
trains, resumes bitwise, accumulates exactly and runs under DDP (tfx/optim/muon.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import GradRecorder, tiny
from parallel_utils import (assert_same_training, final_weights, interrupt_after, parallel_env,  # noqa: F401
                            run_single, run_workers, train_log)
from tfx.config import optimizer_factory
from tfx.core import ConfigError
from tfx.optim.muon import MuonAdamW, muon, newton_schulz_float32
from tfx.train.run import build

HIDDEN = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
          "mlp.fc.weight", "mlp.proj.weight")


def groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"muon": set(), "adamw": set()}
    for g in optimizer.param_groups:
        out[g["algorithm"]].update(names[id(p)] for p in g["params"])
    return out


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def lm_loss(model, x):
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


# -- 1. the partition, and the same update as torch's Muon + AdamW built by hand --------
@pytest.mark.parametrize("tied", [True, False])
def test_hidden_matrices_go_to_muon_the_rest_to_adamw(tmp_path, pydocs_data, tied):
    job = build(tiny("optim=muon", f"model.tie_embeddings={str(tied).lower()}"), tmp_path, data=pydocs_data)
    model, opt = job.model, job.trainer.optimizer
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    got = groups_by_name(model, opt)
    n_layer = job.cfg.model.n_layer
    assert got["muon"] == {f"layers.{i}.{h}" for i in range(n_layer) for h in HIDDEN}
    norms = {f"layers.{i}.{ln}.weight" for i in range(n_layer) for ln in ("ln1", "ln2")} | {"norm.weight"}
    assert got["adamw"] == {"tok_emb.weight", "pos_emb.weight"} | norms | (set() if tied else {"head.weight"})
    assert (model.head.weight is model.tok_emb.weight) == tied
    decay = {g["algorithm"]: g["weight_decay"] for g in opt.param_groups if g["weight_decay"]}
    assert decay == {"muon": 0.1, "adamw": 0.1}  # 1-D parameters: no decay
    # biases (model.bias=true) are vectors: AdamW, no decay
    biased = build(tiny("optim=muon", "model.bias=true"), tmp_path / "bias", data=pydocs_data)
    got = groups_by_name(biased.model, biased.trainer.optimizer)
    assert not any(n.endswith("bias") for n in got["muon"])
    assert {n for n, _ in biased.model.named_parameters() if n.endswith("bias")} <= got["adamw"]


def test_output_layer_found_without_knowing_the_class():
    """An untied head with an unusual name is the Linear onto the vocabulary; a position
    table as large as d_model does not make a square projection an output layer."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(50, 16), torch.nn.Embedding(16, 16)
            self.proj, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
            self.decoder = torch.nn.Linear(16, 50, bias=False)

    net = Net()
    got = groups_by_name(net, muon(net))
    assert got["muon"] == {"proj.weight"}
    assert got["adamw"] == {"tok.weight", "pos.weight", "decoder.weight", "proj.bias", "norm.weight",
                            "norm.bias"}


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "auto"])
def test_step_equals_plain_muon_and_adamw(tmp_path, pydocs_data, ns_dtype, monkeypatch):
    """Bitwise torch's Muon + AdamW built by hand; with ns_dtype=auto (float32 on the CPU)
    torch's Muon given the float32 iteration."""
    job = build(tiny("optim=muon", f"optim.ns_dtype={ns_dtype}"), tmp_path, data=pydocs_data)
    model, opt, c = job.model, job.trainer.optimizer, job.cfg.optim
    ref = copy.deepcopy(model)  # keeps the tied head tied
    hidden = [p for n, p in ref.named_parameters() if n.endswith(HIDDEN)]
    matrices = [p for n, p in ref.named_parameters() if p.dim() == 2 and not n.endswith(HIDDEN)]
    vectors = [p for p in ref.parameters() if p.dim() < 2]
    plain = [torch.optim.Muon(hidden, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum,
                              nesterov=c.nesterov, ns_steps=c.ns_steps, adjust_lr_fn=c.adjust_lr_fn),
             torch.optim.AdamW([{"params": matrices, "weight_decay": c.weight_decay},
                                {"params": vectors, "weight_decay": 0.0}],
                               lr=c.lr, betas=tuple(c.adamw_betas), eps=c.adamw_eps)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # momentum and Adam moments matter from the 2nd step on
        x = torch.randint(0, job.data.vocab_size, (4, 33), generator=gen)
        lm_loss(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss(ref, x).backward()
        with monkeypatch.context() as m:
            if ns_dtype == "auto":
                m.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_float32)
            for o in plain:
                o.step()
                o.zero_grad(set_to_none=True)
    a, b = weights(model), weights(ref)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_config_probe_and_bad_values():
    factory = optimizer_factory(tiny("optim=muon"))  # probed on nn.Linear(2, 2)
    probe = factory(torch.nn.Linear(2, 2))
    assert [g["algorithm"] for g in probe.param_groups] == ["muon", "adamw"]  # weight, bias
    with pytest.raises(ConfigError, match="adjust_lr_fn"):
        optimizer_factory(tiny("optim=muon", "optim.adjust_lr_fn=spectral"))
    with pytest.raises(ConfigError, match="momentum"):
        optimizer_factory(tiny("optim=muon", "optim.momentum=1.5"))
    with pytest.raises(ConfigError, match="unknown key 'betas'"):
        optimizer_factory(tiny("optim=muon", "+optim.betas=[0.9,0.99]"))


def test_state_dict_scheduler_gradscaler_and_dcp_helpers():
    """The parts of the loop that take "the optimizer": LambdaLR, GradScaler (unscale_
    walks param_groups; scales are powers of two, so the step is exact) and DCP's
    get/set_state_dict (sharded checkpoints), each checked against a plain twin."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from tfx.model import GPTConfig

    torch.manual_seed(0)
    model = GPTConfig(n_layer=2, n_head=2, d_model=32).build(vocab_size=64, block_size=16)
    twin = copy.deepcopy(model)
    opt, opt2 = muon(model, lr=3e-3), muon(twin, lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: (s + 1) / 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        scaler.scale(lm_loss(model, x)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        lm_loss(twin, x).backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
        sched2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert {g["lr"] for g in opt._inner["muon"].param_groups} == {3e-3 * 3 / 4}

    # DCP's helpers (what save_sharded/load_sharded call) into a fresh optimizer
    # (state dicts hold the live tensors: copies, as a checkpoint on disk would be)
    msd, osd = copy.deepcopy(get_state_dict(model, opt))
    assert "layers.0.attn.q_proj.weight" in osd["state"]
    fresh_model = GPTConfig(n_layer=2, n_head=2, d_model=32).build(vocab_size=64, block_size=16)
    fresh = muon(fresh_model, lr=3e-3)
    set_state_dict(fresh_model, fresh, model_state_dict=msd, optim_state_dict=osd)
    # plain state_dict round trip into another fresh one
    third_model = copy.deepcopy(model)
    third = muon(third_model, lr=3e-3)
    third.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (fresh_model, fresh), (third_model, third)):
        lm_loss(m, x).backward()
        o.step()
        o.zero_grad(set_to_none=True)
    for m in (fresh_model, third_model):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m.parameters()))
        assert fresh._inner["adamw"].state is fresh.state


# -- 2. it trains ---------------------------------------------------------------------
def test_muon_lowers_the_loss(tmp_path, pydocs_data):
    job = build(tiny("optim=muon", "trainer.max_steps=8"), tmp_path, data=pydocs_data)
    losses = [job.trainer.train_step()["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses


# -- 3. bitwise resume ------------------------------------------------------------------
def test_resume_equals_uninterrupted_run(tmp_path, pydocs_data):
    overrides = ("optim=muon", "trainer.max_steps=6", "trainer.ckpt_every=0")
    full = build(tiny(*overrides), tmp_path / "full", data=pydocs_data)
    full.trainer.fit()
    first = build(tiny(*overrides), tmp_path / "cut", data=pydocs_data)
    first.trainer.callbacks.append(lambda t: t.state.step == 3 and t.request_stop("test"))
    first.trainer.fit()
    second = build(tiny(*overrides, "resume=auto"), tmp_path / "cut", data=pydocs_data)
    assert second.resumed_from is not None and second.trainer.state.step == 3
    assert second.trainer.optimizer._inner["muon"].state is second.trainer.optimizer.state
    second.trainer.fit()
    a, b = weights(full.model), weights(second.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


# -- 4. accumulation -------------------------------------------------------------------
def relative_update_error(ws_a, ws_b):
    """Worst ||w_a - w_b|| / ||w_b - w_b(start)|| over tensors and steps."""
    return max(((wa[n] - wb[n]).norm() / (wb[n] - ws_b[0][n]).norm()).item()
               for wa, wb in zip(ws_a[1:], ws_b[1:]) for n in wb)


def test_accumulation_equals_large_batch(tmp_path, pydocs_data, monkeypatch):
    def run(key, *overrides, steps=2):
        rec = GradRecorder()
        job = build(tiny("optim=muon", *overrides), tmp_path / key, data=pydocs_data, extra_techniques=[rec])
        ws, losses = [weights(job.model)], []
        for _ in range(steps):
            losses.append(job.trainer.train_step()["loss"])
            ws.append(weights(job.model))
        return rec.grads[0], losses, ws

    # optim.ns_dtype=bfloat16 (torch's own Muon): gradients equal to float32 round-off
    # give updates equal to ~1% (measured: 1e-2 after one step, 3e-2 after four) ...
    big = run("big", "trainer.batch_size=8", "optim.ns_dtype=bfloat16")
    acc = run("acc", "trainer.batch_size=2", "trainer.accum_steps=4", "optim.ns_dtype=bfloat16")
    (g_big, l_big, w_big), (g_acc, l_acc, w_acc) = big, acc
    assert g_big.keys() == g_acc.keys()
    for name in g_big:  # the same gradients, to float32 round-off of the sums
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)
    assert l_acc == pytest.approx(l_big, rel=1e-5)
    assert 1e-4 < relative_update_error(w_acc, w_big) < 0.1
    # ... and with the CPU default (ns_dtype=auto: float32) to float32 round-off (measured: 1e-5)
    _, l_big, w_big = run("big32", "trainer.batch_size=8")
    _, l_acc, w_acc = run("acc32", "trainer.batch_size=2", "trainer.accum_steps=4")
    assert relative_update_error(w_acc, w_big) < 1e-4
    for name in w_big[-1]:
        torch.testing.assert_close(w_acc[-1][name], w_big[-1][name], rtol=1e-4, atol=2e-6, msg=name)


def test_float32_newton_schulz_orthogonalises_like_torch():
    """newton_schulz_float32 is torch's iteration in float32: torch's bfloat16 result to
    bfloat16 precision, and U diag(s') V^T with the SVD's U, V (s' near 1: Keller Jordan's
    quintic does not converge to exactly 1, by design)."""
    torch.manual_seed(0)
    coefficients = torch.optim.Muon([torch.zeros(2, 2, requires_grad=True)]).defaults["ns_coefficients"]
    for shape in ((24, 16), (16, 24), (32, 32)):
        g = torch.randn(shape)
        ours = newton_schulz_float32(g, coefficients, 5, 1e-7)
        theirs = torch.optim._muon._zeropower_via_newtonschulz(g, coefficients, 5, 1e-7).float()
        assert ours.dtype == torch.float32 and ours.shape == g.shape
        assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-2
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        core = u.T @ ours.double() @ vh.T  # diagonal when ours shares g's singular vectors
        off = core - torch.diag(torch.diagonal(core))
        assert off.abs().max().item() < 1e-5
        assert 0.5 < torch.diagonal(core).min().item() and torch.diagonal(core).max().item() < 1.3


def test_ns_dtype_auto_is_float32_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr("tfx.optim.muon.newton_schulz_float32",
                        lambda *a: calls.append(1) or newton_schulz_float32(*a))
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8))
    for ns_dtype, used in (("auto", True), ("float32", True), ("bfloat16", False)):
        calls.clear()
        opt = muon(model, ns_dtype=ns_dtype)
        model(torch.tensor([[1, 2]])).sum().backward()
        opt.step()
        opt.zero_grad()
        assert bool(calls) == used, ns_dtype
    assert torch.optim._muon._zeropower_via_newtonschulz.__module__ == "torch.optim._muon"  # restored
    with pytest.raises(ConfigError, match="ns_dtype"):
        muon(model, ns_dtype="fp16")


# -- 5. DDP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory, parallel_env):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("muon_single")
    run_single(run_dir, "optim=muon", "trainer.batch_size=4")
    return run_dir


@pytest.fixture(scope="module")
def muon_ddp(tmp_path_factory, parallel_env):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("muon_ddp")
    summary = run_workers(run_dir, 2, "parallel=ddp", "optim=muon", "trainer.batch_size=2")
    return run_dir, summary


def assert_close_training(run_a, run_b):
    """Per-step loss and gradient norm, and the final weights, to the tolerance the
    AdamW parallel tests use: Newton-Schulz runs in float32 on the CPU (ns_dtype=auto),
    so the all-reduce's other summation order stays float32 round-off."""
    assert_same_training(run_a, run_b)


def test_ddp_matches_single(muon_reference, muon_ddp):
    run_dir, summary = muon_ddp
    assert summary["world_size"] == 2 and summary["dp_size"] == 2
    assert_close_training(run_dir, muon_reference)


def test_ddp_sharded_resume_equals_uninterrupted(muon_ddp, tmp_path):
    full, _ = muon_ddp
    assert (full / "checkpoints" / "step_00000002.dcp").is_dir()  # DCP: get_state_dict(model, optimizer)
    resumed = interrupt_after(full, tmp_path / "resumed", 2)
    run_workers(resumed, 2, "parallel=ddp", "optim=muon", "trainer.batch_size=2", "resume=auto")
    assert_same_training(resumed, full, steps={3, 4}, atol=0, rtol=0)


def test_fused_adamw_matches_foreach():
    """optim.fused=true is torch's fused kernel: the same AdamW update to round-off."""
    from tfx.optim import adamw

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b = copy.deepcopy(a)
    opt_a, opt_b = adamw(a, lr=1e-2), adamw(b, lr=1e-2, fused=True)
    assert opt_b.defaults["fused"] and not opt_a.defaults["fused"]
    x = torch.randn(32, 8)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError):
        adamw(a, fused="yes")


# -- 6. sharded parameters: FSDP2 and tensor parallel ------------------------------------
class _MLPLM(torch.nn.Module):
    """Embedding -> two hidden matrices (Muon) -> head (AdamW): small enough to shard by hand."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.fc = torch.nn.Linear(16, 24, bias=False)
        self.proj = torch.nn.Linear(24, 16, bias=False)
        self.head = torch.nn.Linear(16, 32, bias=False)

    def forward(self, x):
        return self.head(self.proj(torch.relu(self.fc(self.emb(x)))))


def _sharded_worker(rank, world, store, mode, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = _MLPLM()
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for m in (model.fc, model.proj):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        parallelize_module(model, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    opts = [muon(m, lr=2e-2, ns_dtype="float32") for m in (ref, model)]  # float32: exact comparison
    for _ in range(3):
        for m, opt in zip((ref, model), opts):
            lm_loss(m, x).backward()
            opt.step()
            opt.zero_grad()
    sharded = {n: type(p).__name__ == "DTensor" for n, p in model.named_parameters()}
    full = {n: (p.full_tensor() if sharded[n] else p).detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"ref": dict(ref.named_parameters()), "sharded": full, "is_dtensor": sharded,
                    "groups": groups_by_name(model, opts[1])}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fsdp", "tp"])
def test_sharded_parameters_match_one_process(tmp_path, mode):
    """torch's Muon on DTensor parameters (FSDP2's Shard(0), TP's Shard(0)/Shard(1)) makes
    the update one process makes, to float32 round-off with a float32 Newton-Schulz
    (with bfloat16 it differs by ~1% of an update: this comparison fails)."""
    out = tmp_path / "weights.pt"
    torch.multiprocessing.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), mode, str(out)), nprocs=2)
    got = torch.load(out)
    assert got["is_dtensor"]["fc.weight"] and got["is_dtensor"]["proj.weight"]
    assert got["groups"]["muon"] == {"fc.weight", "proj.weight"}
    for name, ref in got["ref"].items():
        torch.testing.assert_close(got["sharded"][name], ref.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("parallel,batch", [("fsdp", 2), ("tp", 4)])
def test_fsdp_and_tp_train_like_single(muon_reference, tmp_path, parallel, batch):
    """Through the launcher: parallel=fsdp/tp with optim=muon follows the one-process run
    (to what bfloat16 Newton-Schulz makes of round-off, as for DDP)."""
    summary = run_workers(tmp_path, 2, f"parallel={parallel}", "optim=muon", f"trainer.batch_size={batch}")
    assert summary["world_size"] == 2
    assert_close_training(tmp_path, muon_reference)
