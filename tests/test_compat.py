"""scripts/compat.py on a 3-option subset: every outcome is classified, none crashes."""
from __future__ import annotations

import importlib.util

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
                      "--out", str(out)])
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
