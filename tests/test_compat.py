"""scripts/compat.py on a 3-option subset: every outcome is classified, none crashes."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT


def _compat():
    spec = importlib.util.spec_from_file_location("compat", ROOT / "scripts" / "compat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compat_subset_classifies_works_and_refusals(tmp_path, capsys):
    compat = _compat()
    out = tmp_path / "compat.md"
    rc = compat.main(["--only", "precision=fp8", "memory=activation_ckpt", "compression=prune",
                      "--out", str(out), "--jobs", "2"])
    text = out.read_text()
    assert rc == 0, text
    assert "3 jobs: 1 work, 2 refused, 0 crash." in text
    assert "| `memory=activation_ckpt compression=[prune]` | works |" in text
    assert "| `precision=fp8 memory=activation_ckpt` | refused | precision=fp8 needs a CUDA GPU" in text


def test_every_conf_option_is_in_the_matrix():
    compat = _compat()
    opts = compat.options()
    for group in ("precision", "memory", "attention", "compression", "parallel"):
        on_disk = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
        assert on_disk == set(opts[group]), group


def test_model_axis_pairs_the_own_gpt_with_an_hf_llama():
    compat = _compat()
    opts = compat.options()
    assert opts["model"] == ["tiny", "hf_llama"] and opts["compile"] == ["false", "true"]
    hf = compat.override("model", "hf_llama")
    assert hf[0] == "model=smollm2_student" and "model.config_overrides.num_hidden_layers=2" in hf
    jobs = compat.pairs({"model": opts["model"], "memory": ["none", "activation_ckpt"]})
    assert [compat.label(j) for j in jobs] == ["model=hf_llama memory=activation_ckpt"]


@pytest.mark.slow
def test_sampled_pairs_do_not_crash(tmp_path):
    """What CI runs of the whole matrix: a fixed random sample of its pairs (the full
    matrix, docs/compat.md, takes ~15 min with --jobs 2)."""
    compat = _compat()
    out = tmp_path / "compat.md"
    rc = compat.main(["--sample", "8", "--seed", "0", "--jobs", "2", "--out", str(out)])
    assert rc == 0, out.read_text()
    assert "8 jobs:" in out.read_text() and "0 crash." in out.read_text()
