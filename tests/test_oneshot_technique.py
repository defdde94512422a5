"""``compression=wanda|sparsegpt|gptq`` as techniques: through the real build order on
tfx's tiny GPT (trained weights via ``from_checkpoint``), on a random tiny Llama and
GPT-2 (direct calls) and through ``model=hf``; structure reached, masks kept through
training, resume without recalibration, exact artefact reloads, bad input.

The algorithms themselves are checked against references in tests/test_oneshot.py."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from conftest import TINY, run_cli, tiny
from tfx.compression import GPTQ, SparseGPT, Wanda, load_compressed_state, load_gptq, load_sparse
from tfx.compression.oneshot import technique as oneshot_technique
from tfx.compression.oneshot.gptq import dequantize
from tfx.compression.oneshot.storage import pack_bits, read_gptq, unpack_bits
from tfx.compression.oneshot.technique import oneshot_targets
from tfx.core import ConfigError, RunContext
from tfx.data.blocks import TokenBlocks
from tfx.log.metrics import export_bytes
from tfx.model import GPT, GPTConfig
from tfx.train.run import build, train as run_train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory, pydocs_data):
    """A briefly trained tiny GPT: the run every one-shot method starts from."""
    run_dir = tmp_path_factory.mktemp("oneshot_base")
    run_train(tiny("trainer.max_steps=30"), run_dir, data=pydocs_data)
    return run_dir


def cfg_for(option, base_dir, *overrides, steps=0):
    return tiny(f"compression={option}", f"compression.{option}.from_checkpoint={base_dir}",
                f"trainer.max_steps={steps}", *overrides)


def weights(model):
    """name -> effective (out, in) weight of every compressed Linear (prune's ``weight``
    attribute is only refreshed by a forward, so compute it from its parts)."""
    return {n: (m.weight_orig * m.weight_mask if prune.is_pruned(m) else m.weight).detach().clone()
            for n, m in oneshot_targets(model)}


def masks(model):
    return {n: m.weight_mask.detach().clone().bool() for n, m in oneshot_targets(model)}


@pytest.fixture(scope="module")
def dense(base):
    from tfx.ckpt import load_run

    model, _ = load_run(base)
    return weights(model)


# -- structure reached through the build order --------------------------------------------
PRUNING = {
    "wanda-50": ("wanda", ["compression.wanda.sparsity=0.5"]),
    "magnitude-30": ("wanda", ["compression.wanda.sparsity=0.3", "compression.wanda.method=magnitude"]),
    "wanda-2:4": ("wanda", ["compression.wanda.n=2", "compression.wanda.m=4"]),
    "magnitude-4:8": ("wanda", ["compression.wanda.n=4", "compression.wanda.m=8",
                                "compression.wanda.method=magnitude"]),
    "sparsegpt-50": ("sparsegpt", ["compression.sparsegpt.sparsity=0.5",
                                   "compression.sparsegpt.blocksize=64"]),
    "sparsegpt-2:4": ("sparsegpt", ["compression.sparsegpt.n=2", "compression.sparsegpt.m=4"]),
}


@pytest.mark.parametrize("case", PRUNING)
def test_pruning_structure_through_the_build(case, base, dense, tmp_path, pydocs_data):
    option, overrides = PRUNING[case]
    job = build(cfg_for(option, base, *overrides), tmp_path, data=pydocs_data)
    tech = job.pipeline.techniques[-1]
    assert tech.key == option
    ws, ms = weights(job.model), masks(job.model)
    assert set(ws) == set(dense) and len(ws) == 2 * 6  # q, k, v, o, fc, proj per layer
    zeros = total = 0
    for name, w in ws.items():
        keep = ms[name]
        rows, cols = w.shape
        assert (w[~keep] == 0).all()
        if tech.m is not None:  # at most (exactly, by the mask) n of every m kept
            assert (keep.view(rows, -1, tech.m).sum(-1) == tech.n).all()
        elif option == "wanda":  # exactly floor(s * in) pruned in every row
            assert (((~keep).sum(1)) == int(tech.sparsity * cols)).all()
        else:  # SparseGPT: floor(s * rows * block) pruned per block of columns
            expected = sum(int(tech.sparsity * rows * min(tech.blocksize, cols - c))
                           for c in range(0, cols, tech.blocksize))
            assert int((~keep).sum()) == expected
        if option == "wanda":  # no update: kept weights are the trained ones
            assert torch.equal(w[keep], dense[name][keep])
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        if case == "magnitude-30":  # independent reference: numpy sort of |W| per row
            ref = np.zeros((rows, cols), dtype=bool)
            mag = np.abs(dense[name].numpy())
            for r in range(rows):
                ref[r, np.argsort(-mag[r], kind="stable")[:cols - int(0.3 * cols)]] = True
            np.testing.assert_array_equal(keep.numpy(), ref)
    assert tech.metrics()[f"{option}/sparsity"] == pytest.approx(zeros / total)
    if option == "sparsegpt":  # the remaining weights were updated (OBS reconstruction)
        assert any(not torch.equal(w[ms[n]], dense[n][ms[n]]) for n, w in ws.items())
    report = tech.metrics()
    calibrated = "magnitude" not in case
    assert (report[f"{option}/calib_time_s"] > 0) == calibrated
    assert report[f"{option}/compress_time_s"] > 0
    assert report[f"{option}/calib_tokens"] == (tech.n_samples * 32 if calibrated else 0)


@pytest.mark.parametrize("option,overrides", [
    ("wanda", ["compression.wanda.sparsity=0.5"]),
    ("sparsegpt", ["compression.sparsegpt.n=2", "compression.sparsegpt.m=4"]),
])
def test_masks_survive_training(option, overrides, base, tmp_path, pydocs_data):
    job = build(cfg_for(option, base, *overrides, steps=3), tmp_path, data=pydocs_data)
    before_w, before_m = weights(job.model), masks(job.model)
    job.trainer.fit()
    after_w, after_m = weights(job.model), masks(job.model)
    for name in before_w:
        assert torch.equal(before_m[name], after_m[name])
        assert (after_w[name][~after_m[name]] == 0).all()
    assert any(not torch.equal(before_w[n], after_w[n]) for n in before_w)  # it did train
    assert job.trainer.state.step == 3


# -- one-shot runs: summary, exports, evaluate -----------------------------------------------
def test_one_shot_run_writes_summary_and_sparse_export(base, tmp_path, pydocs_data):
    summary = run_train(cfg_for("wanda", base), tmp_path, data=pydocs_data)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["step"] == 0 and math.isfinite(on_disk["val_ppl"])
    for key in ("wanda/sparsity", "wanda/calib_time_s", "wanda/compress_time_s",
                "wanda/sparse_bytes", "wanda/dense_bytes", "wanda/size_ratio"):
        assert key in on_disk, key
    assert on_disk["wanda/sparsity"] == pytest.approx(0.5)
    assert export_bytes(summary) == summary["wanda/sparse_bytes"]
    assert summary["wanda/sparse_bytes"] == (tmp_path / "model_sparse.tfxs").stat().st_size
    # the .tfxs reloads to the run's weights
    from tfx.ckpt import load_run

    model, cfg = load_run(tmp_path)
    fresh = GPT(GPTConfig(**model.cfg.__dict__))
    load_compressed_state(fresh, load_sparse(tmp_path / "model_sparse.tfxs"))
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


# -- resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("option,overrides", [
    ("wanda", ["compression.wanda.sparsity=0.6"]),
    ("gptq", ["compression.gptq.bits=3", "compression.gptq.group_size=64"]),
])
def test_resume_does_not_recalibrate_and_matches_uninterrupted(option, overrides, base, tmp_path,
                                                               pydocs_data, monkeypatch):
    calls = []
    real = oneshot_technique.compress_sequential
    monkeypatch.setattr(oneshot_technique, "compress_sequential",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = cfg_for(option, base, *overrides, steps=4)
    ref = build(cfg, tmp_path / "ref", data=pydocs_data)
    ref.trainer.fit()
    first = build(cfg, tmp_path / "cut", data=pydocs_data)
    first.trainer.callbacks.append(lambda t: t.request_stop("test") if t.state.step == 2 else None)
    first.trainer.fit()
    assert len(calls) == 2
    resumed = build(cfg, tmp_path / "cut", data=pydocs_data)
    assert len(calls) == 2  # no recalibration: weights, masks, grids come from the checkpoint
    assert resumed.trainer.state.step == 2
    resumed.trainer.fit()
    ref_sd, new_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    # the report (timings included) travels in the checkpoint
    assert resumed.pipeline.techniques[-1].metrics() == first.pipeline.techniques[-1].metrics()


# -- GPTQ / RTN artefact -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides,bits,group", [
    (["compression.gptq.bits=4", "compression.gptq.group_size=128"], 4, 128),
    (["compression.gptq.bits=3", "compression.gptq.group_size=-1", "compression.gptq.act_order=true",
      "compression.gptq.sym=true"], 3, -1),
    (["compression.gptq.method=rtn", "compression.gptq.bits=3", "compression.gptq.group_size=64"], 3, 64),
    # activation checkpointing wraps the blocks after GPTQ named its layers (the export crashed)
    (["compression.gptq.bits=4", "compression.gptq.group_size=64", "memory=activation_ckpt"], 4, 64),
])
def test_gptq_artefact_reloads_exactly_and_weights_stay_frozen(overrides, bits, group, base, dense,
                                                              tmp_path, pydocs_data):
    from tfx.ckpt import load_run

    summary = run_train(cfg_for("gptq", base, *overrides, steps=2), tmp_path, data=pydocs_data)
    path = tmp_path / "model_gptq.pt"
    assert summary["gptq/bytes"] == path.stat().st_size == export_bytes(summary)
    assert summary["gptq/bytes"] < summary["gptq/dense_bytes"]
    assert summary["gptq/bits"] == bits
    model, _ = load_run(tmp_path)
    quantized, rest = read_gptq(path)
    expected_bits, n_weights = 0.0, 0
    for name, w in weights(model).items():
        q = quantized[name]
        assert torch.equal(q.weight, w)  # bit for bit the in-model weights
        assert int(q.codes.max()) <= 2 ** bits - 1 and q.codes.dtype == torch.uint8
        assert torch.equal(dequantize(q.codes, q.scales, q.zeros, q.g_idx), w)
        group_cols = w.shape[1] if group == -1 else group
        expected_bits += w.numel() * (bits + (32 + bits) / group_cols)
        n_weights += w.numel()
        if "sym=true" in " ".join(overrides):
            assert (q.zeros == 2 ** (bits - 1)).all()
    assert summary["gptq/bits_per_weight"] == pytest.approx(expected_bits / n_weights, rel=1e-3)
    # The two training steps tuned the rest but left the quantized weights on their grid.
    assert not torch.equal(model.tok_emb.weight, load_run(base)[0].tok_emb.weight)
    fresh = GPT(GPTConfig(**model.cfg.__dict__))
    load_compressed_state(fresh, load_gptq(path))
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_bit_packing_round_trip():
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        values = torch.randint(0, 2 ** bits, (1001,), generator=g).to(torch.uint8)
        packed = pack_bits(values, bits)
        assert packed.numel() == math.ceil(1001 * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_gptq_then_wanda_compose_and_wanda_then_gptq_is_refused(base, tmp_path, pydocs_data):
    job = build(tiny("compression=[gptq,wanda]", f"compression.gptq.from_checkpoint={base}",
                     "trainer.max_steps=0"), tmp_path / "ok", data=pydocs_data)
    gptq, wanda = job.pipeline.techniques[-2:]
    assert wanda.metrics()["wanda/sparsity"] == pytest.approx(0.5)
    out = gptq.export(job.model, tmp_path / "ok", job.ctx)  # pruned zeros lie on every grid
    sd = load_gptq(tmp_path / "ok" / "model_gptq.pt")
    for name, w in weights(job.model).items():
        assert torch.equal(sd[f"{name}.weight"], w)
    assert out["gptq/bytes"] > 0
    with pytest.raises(ConfigError, match="gptq.*pruning mask"):
        build(tiny("compression=[wanda,gptq]", f"compression.gptq.from_checkpoint={base}",
                   "trainer.max_steps=0"), tmp_path / "bad", data=pydocs_data)


# -- quality against the baselines (numbers printed, orderings asserted) -----------------------
def logits_rel_err(model, ref, batches):
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            a, b = ref(x).double(), model(x).double()
            num += float((a - b).square().sum())
            den += float((a - a.mean(-1, keepdim=True)).square().sum())
    return math.sqrt(num / den)


def test_calibrated_methods_beat_their_baselines(base, tmp_path, pydocs_data):
    from tfx.ckpt import load_run

    ref, _ = load_run(base)
    val = pydocs_data.val
    batches = [val.get_batch(range(i, i + 4))["input_ids"] for i in range(0, 16, 4)]
    variants = {
        "magnitude 50%": ("wanda", ["compression.wanda.method=magnitude"]),
        "wanda 50%": ("wanda", []),
        "sparsegpt 50%": ("sparsegpt", []),
        "rtn 3-bit g64": ("gptq", ["compression.gptq.method=rtn", "compression.gptq.bits=3",
                                   "compression.gptq.group_size=64"]),
        "gptq 3-bit g64": ("gptq", ["compression.gptq.bits=3", "compression.gptq.group_size=64"]),
    }
    err, loss = {}, {}
    for label, (option, overrides) in variants.items():
        job = build(cfg_for(option, base, *overrides), tmp_path / label.replace(" ", "_"),
                    data=pydocs_data)
        job.model.eval()
        err[label] = logits_rel_err(job.model, ref, batches)
        loss[label] = job.trainer.evaluate(max_batches=4)["loss"]
    dense_loss = evaluate_dense(ref, pydocs_data)
    print(f"\ndense val loss {dense_loss:.4f}")
    for label in variants:
        print(f"{label:16s} logits rel err {err[label]:.4f}  val loss {loss[label]:.4f}")
    assert all(math.isfinite(v) for v in loss.values())
    assert err["sparsegpt 50%"] < err["magnitude 50%"]
    assert err["wanda 50%"] < 1.25 * err["magnitude 50%"]
    assert err["gptq 3-bit g64"] < err["rtn 3-bit g64"]
    assert loss["sparsegpt 50%"] < loss["magnitude 50%"] + 0.02
    assert loss["wanda 50%"] < loss["magnitude 50%"] + 0.02


def evaluate_dense(model, data):
    from tfx.evaluation import evaluate_lm

    return evaluate_lm(model, data.val, 4, torch.device("cpu"), max_batches=4)["loss"]


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["compression=wanda", "compression.wanda.sparsity=1.0"],
     "compression.wanda: sparsity must be in [0, 1)"),
    (["compression=sparsegpt", "compression.sparsegpt.sparsity=-0.1"], "sparsity must be in [0, 1)"),
    (["compression=wanda", "compression.wanda.n=5", "compression.wanda.m=4"], "0 < n <= m"),
    (["compression=sparsegpt", "compression.sparsegpt.n=2"], "both n and m"),
    (["compression=wanda", "compression.wanda.method=random"], "choose 'wanda' or 'magnitude'"),
    (["compression=gptq", "compression.gptq.bits=9"], "compression.gptq: bits must be an integer in 2..8"),
    (["compression=gptq", "compression.gptq.bits=1"], "bits must be an integer in 2..8"),
    (["compression=gptq", "compression.gptq.group_size=0"], "group_size=0 must be -1"),
    (["compression=gptq", "compression.gptq.group_size=48"], "divisor of in_features=128"),
    (["compression=wanda", "compression.wanda.n=2", "compression.wanda.m=3"], "m=3 does not divide"),
    (["compression=wanda", "compression.wanda.n_samples=100000"], "lower n_samples or seq_len"),
    (["compression=sparsegpt", "compression.sparsegpt.seq_len=64"], "longer than the model's 32 positions"),
    (["compression=[prune,wanda]"], "prune and wanda all set the pruning masks"),
])
def test_bad_input_is_one_line_config_error(overrides, message, tmp_path, pydocs_data):
    with pytest.raises(ConfigError) as err:
        build(tiny("trainer.max_steps=0", *overrides), tmp_path, data=pydocs_data)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("tech", [Wanda(), SparseGPT(n=2, m=4), GPTQ(method="rtn", group_size=-1)])
def test_model_without_linear_layers_is_refused(tech):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Scale())
    ctx = RunContext(train_data=TokenBlocks(np.arange(4000) % 64, 16))
    with pytest.raises(ConfigError) as err:
        tech.apply_to_model(model, ctx)
    assert "no Linear layers" in str(err.value) and str(err.value).startswith(f"compression.{tech.key}")
    model.layers = nn.ModuleDict()
    with pytest.raises(ConfigError, match="no decoder layers"):
        tech.apply_to_model(model, ctx)


def test_bad_input_through_the_cli(tmp_path):
    res = run_cli(["train.py", *TINY, "compression=wanda", "compression.wanda.sparsity=1.5",
                   f"hydra.run.dir={tmp_path / 'a'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "error: compression.wanda: sparsity must be in [0, 1), got 1.5"
    res = run_cli(["train.py", *TINY, "compression=gptq", "compression.gptq.n_samples=100000",
                   "trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'b'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: compression.gptq: calibration needs n_samples*seq_len = "
                           "100000*32") and "lower n_samples" in last


# -- Hugging Face models (random tiny Llama and GPT-2) ---------------------------------------
def tiny_hf(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


HF_METHODS = {
    "wanda": lambda: Wanda(sparsity=0.5, n_samples=8, seq_len=16),
    "magnitude-2:4": lambda: Wanda(n=2, m=4, method="magnitude"),
    "sparsegpt-2:4": lambda: SparseGPT(n=2, m=4, n_samples=8, seq_len=16),
    "sparsegpt-50": lambda: SparseGPT(sparsity=0.5, n_samples=8, seq_len=16),
    "gptq": lambda: GPTQ(bits=4, group_size=16, n_samples=8, seq_len=16),
    "rtn": lambda: GPTQ(bits=3, group_size=-1, method="rtn"),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_models_direct(family, method, tmp_path):
    model = tiny_hf(family)
    stream = torch.randint(64, (3000,), generator=torch.Generator().manual_seed(1)).numpy()
    ctx = RunContext(train_data=TokenBlocks(stream, 16), seed=0)
    tech = HF_METHODS[method]()
    tech.apply_to_model(model, ctx)
    targets = oneshot_targets(model)
    assert len(targets) == 2 * (7 if family == "llama" else 4)
    x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()
    is_gptq = isinstance(tech, GPTQ)
    for name, mod in targets:
        w = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()
        if not is_gptq:
            assert prune.is_pruned(mod)
            if tech.m is not None:
                assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
        else:
            assert not mod.weight.requires_grad
    if not is_gptq:
        assert tech.metrics()[f"{tech.key}/sparsity"] == pytest.approx(0.5, abs=0.01)
    # resume / load_run: a fresh model with the technique re-applied takes the state strictly
    again = tiny_hf(family)
    tech2 = HF_METHODS[method]()
    tech2.apply_to_model(again, RunContext(resuming=True))  # no train_data: must not calibrate
    again.load_state_dict(model.state_dict())
    tech2.load_state_dict(copy.deepcopy(tech.state_dict()))
    assert tech2.metrics() == tech.metrics()
    with torch.no_grad():
        assert torch.equal(again(x).logits, logits)
    # the export reloads into a plain fresh model
    out = tech2.export(again, tmp_path, ctx)
    sd = load_gptq(tmp_path / "model_gptq.pt") if is_gptq else load_sparse(tmp_path / "model_sparse.tfxs")
    plain = tiny_hf(family)
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, logits)
    assert out[f"{tech.key}/{'bytes' if is_gptq else 'sparse_bytes'}"] > 0


def test_hf_model_through_the_build(tmp_path):
    """``model=hf`` (tfx's wrapper of a HF model) through the real build order."""
    pytest.importorskip("transformers")
    hf_utils = pytest.importorskip("hf_utils")
    from tfx.config import model_spec, use_model_tokenizer
    from tfx.data import prepare_data

    folder = hf_utils.save_tiny_llama(tmp_path / "tiny-llama")
    cfg = hf_utils.hf_cfg(folder, "compression=[gptq,wanda]", "compression.gptq.group_size=16",
                          "trainer.max_steps=2", "compression.wanda.n=2", "compression.wanda.m=4")
    use_model_tokenizer(cfg, model_spec(cfg))
    data = prepare_data(cfg.data)
    summary = run_train(cfg, tmp_path / "run", data=data)
    # 2:4 masks prune half; a few kept weights were quantized to exactly 0 before
    assert 0.5 <= summary["wanda/sparsity"] < 0.52 and summary["gptq/bits"] == 4
    assert math.isfinite(summary["val_loss"])
    from tfx.ckpt import load_run

    model, _ = load_run(tmp_path / "run")
    sd = load_gptq(tmp_path / "run" / "model_gptq.pt")
    for name, w in weights(model).items():
        assert torch.equal(sd[f"lm.{name}.weight"], w)


def test_hf_export_folds_oneshot_masks(tmp_path):
    """Wanda's masks are folded at export: hf_model/ is a plain save_pretrained folder
    with the zeros in place and the trained run's logits."""
    pytest.importorskip("transformers")
    hf_utils = pytest.importorskip("hf_utils")
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run
    from tfx.config import model_spec, use_model_tokenizer
    from tfx.data import prepare_data

    folder = hf_utils.save_tiny_llama(tmp_path / "tiny-llama")
    cfg = hf_utils.hf_cfg(folder, "compression=wanda", "trainer.max_steps=1", "compression.wanda.sparsity=0.5")
    use_model_tokenizer(cfg, model_spec(cfg))
    summary = run_train(cfg, tmp_path / "run", data=prepare_data(cfg.data))
    assert "hf_model_skipped" not in summary
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_model").eval()
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 0.02
    model, _ = load_run(tmp_path / "run")
    x = torch.randint(0, reloaded.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model.eval()(x), atol=1e-5, rtol=1e-5)
