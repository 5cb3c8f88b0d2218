"""`vitxai explain` and `vitxai methods` from the command line."""

from __future__ import annotations

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from vitxai.cli import main
from vitxai.methods import METHODS


def test_explain_writes_overlays_and_maps(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    code = main(["explain", "--image", str(image), "--model", "vit_tiny_patch16_224",
                 "--random-weights", "--methods", "attention_rollout", "grad_rollout",
                 "--category-index", "7", "--head-fusion", "max", "--discard-ratio", "0.5",
                 "--out", str(out)])
    assert code == 0
    assert (out / "photo.png").stat().st_size > 5000
    saved = load_file(str(out / "photo.safetensors"))
    assert saved["target"].tolist() == [7]
    assert saved["attention_rollout.map"].shape == (224, 224)
    assert saved["grad_rollout.native"].shape == (14, 14)


def test_explain_bad_parameter_is_one_line_error(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["explain", "--image", str(image), "--model", "vit_tiny_patch16_224",
                 "--random-weights", "--discard-ratio", "1.0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "discard_ratio" in err and "[0.0, 1.0)" in err


def test_methods_lists_every_method_with_paper(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, spec in METHODS.items():
        assert name in text and spec.paper.split(",")[0] in text
    assert "--param lime.n_samples=1000" in text
