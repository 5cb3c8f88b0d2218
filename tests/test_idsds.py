"""IDSDS (Hesse et al. 2024, "Benchmarking the Attribution Quality of Vision Models", NeurIPS
D&B): the cell-deletion fine-tuning (`vitxai finetune-deletion`), its resume, and
`vitxai evaluate --idsds` with incremental deletion, on the bundled ViT with tiny settings."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import images_for, tiny_vit
from PIL import Image
from safetensors.torch import load_file, save_file

import vitxai.finetune as finetune
from vitxai.cli import main
from vitxai.evaluate import EvaluateSettings, _idsds_table
from vitxai.finetune import FinetuneSettings, delete_cells, finetune_deletion, random_cells
from vitxai.metrics.faithfulness import single_deletion
from vitxai.source import RunSource

QUIET = ["--no-progress"]
#: 24 training images in batches of 8: 3 steps per epoch
TINY = FinetuneSettings(epochs=2, step_size=1, batch_size=8, val_size=8)
TINY_SOURCE = RunSource(n_images=24, data_seed=1)


def _drops(adapter, x, t, grid):
    """d_k by explicit loops: logit(x) − logit(x with cell k at the model's mean colour)."""
    h = x.shape[-1] // grid
    y0 = adapter.predict(x)[torch.arange(len(x)), t]
    drops = torch.zeros(len(x), grid * grid, dtype=torch.float64)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        xk = x.clone()
        xk[:, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = adapter.mean
        drops[:, k] = y0 - adapter.predict(xk)[torch.arange(len(x)), t]
    return drops


def test_oracle_gives_one_negation_minus_one_constant_nan_counted(vit64):
    x, t, grid = images_for(vit64, 3), torch.tensor([1, 5, 7]), 2
    drops = _drops(vit64, x, t, grid)
    oracle = (drops.view(3, grid, grid) / 256).repeat_interleave(16, 1).repeat_interleave(16, 2)
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.allclose(single_deletion(vit64, x, oracle, t, grid=grid), ones)
    assert torch.allclose(single_deletion(vit64, x, -oracle, t, grid=grid), -ones)
    constant = single_deletion(vit64, x, torch.full_like(oracle, 0.3), t, grid=grid)
    assert torch.isnan(constant).all()
    rows = [{"index": i, "method": "oracle", "idsds": 1.0, "single_deletion": 1.0}
            for i in range(3)]
    rows += [{"index": i, "method": "constant", "idsds": float(v), "single_deletion": 0.5}
             for i, v in enumerate(constant)]
    card = {"baseline": {"idsds": "zeros"}, "base_model": {"model": "tiny"},
            "epochs": {"done": 1, "best": 1},
            "accuracy": {k: {"clean_accuracy": 1.0, "deleted_accuracy": 1.0}
                         for k in ("before", "after")}}
    table = _idsds_table(rows, ["oracle", "constant"], card, {"target": "label"},
                         EvaluateSettings(grid=grid))
    (body,) = [v["rows"] for v in table.values()]
    assert body[0][1:4] == ["1.0000", "[1.0000, 1.0000]", "0"]
    assert body[1][1] == "nan" and body[1][3] == "3" and body[1][6] == "0"


def test_augmentation_deletes_exactly_one_cell_half_the_time():
    n, grid = 2000, 4
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    baselines = torch.full_like(images, -1.0)  # outside [0, 1]: every deleted pixel changes
    cells = random_cells(n, grid, torch.Generator().manual_seed(3))
    assert torch.equal(cells, random_cells(n, grid, torch.Generator().manual_seed(3)))
    out = delete_cells(images, baselines, cells, grid)
    changed = (out != images).any(1).view(n, grid, 8, grid, 8).all(4).all(2).view(n, -1)
    touched = (out != images).any(1).view(n, grid, 8, grid, 8).any(4).any(2).view(n, -1)
    assert torch.equal(changed, touched)  # whole cells only
    deleted = cells >= 0
    assert abs(int(deleted.sum()) - n / 2) < 4 * math.sqrt(n / 4)  # Binomial(n, ½), 4 σ
    assert torch.equal(changed.sum(1), deleted.long())  # exactly one cell, or none
    assert torch.equal(changed[deleted].float().argmax(1), cells[deleted])
    counts = torch.bincount(cells[deleted], minlength=grid * grid)
    assert counts.min() > 0.5 * counts.float().mean()  # every cell is drawn


def _final_model(out):
    return torch.load(out / finetune.RESUME, weights_only=True)["model"]


def test_resume_after_a_kill_or_the_time_budget_gives_the_same_checkpoint(tmp_path,
                                                                        monkeypatch):
    whole = tmp_path / "whole"
    card = finetune_deletion(whole, TINY_SOURCE, TINY, checkpoint_every_s=0, progress=False)
    assert card["epochs"]["complete"] and card["time"]["invocations"] == 1

    # a kill before the fifth step (epoch 2, step 2), then the same call again
    killed, steps = tmp_path / "killed", []
    real_step = finetune._train_step

    def dying(*args):
        steps.append(args[-2:])
        if len(steps) == 5:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(finetune, "_train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune_deletion(killed, TINY_SOURCE, TINY, checkpoint_every_s=0, progress=False)
    assert steps[-1] == (1, 1)
    monkeypatch.setattr(finetune, "_train_step", real_step)
    resumed = finetune_deletion(killed, TINY_SOURCE, TINY, checkpoint_every_s=0,
                                progress=False)
    assert resumed["time"]["invocations"] == 2

    # a time budget spent before the first step, then the same call without one
    budget = tmp_path / "budget"
    first = finetune_deletion(budget, TINY_SOURCE, TINY, time_budget_s=0, progress=False)
    assert not first["epochs"]["complete"] and first["weights"] is None
    finetune_deletion(budget, TINY_SOURCE, TINY, progress=False)

    reference = (whole / finetune.WEIGHTS).read_bytes()
    for out in (killed, budget):
        assert (out / finetune.WEIGHTS).read_bytes() == reference
        last, ref = _final_model(out), _final_model(whole)
        assert all(torch.equal(last[k], ref[k]) for k in ref)
        assert json.loads((out / finetune.CARD).read_text())["history"] == card["history"]
    assert load_file(str(whole / finetune.WEIGHTS)).keys() == _final_model(whole).keys()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A synthetic run (labels), an unlabelled folder run, and a tiny cell-deletion
    fine-tune of the bundled ViT."""
    root = tmp_path_factory.mktemp("idsds")
    labelled = root / "run"
    assert main(["compare", "--n-images", "2", "--methods", "rollout", "IG", "--param",
                 "integrated_gradients.steps=2", "--save-attr-maps", "--out", str(labelled),
                 *QUIET]) == 0
    images = root / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(images / "a.png")
    unlabelled = root / "folder-run"
    assert main(["compare", "--data", str(images), "--model", "bundled", "--methods",
                 "rollout", "--save-attr-maps", "--out", str(unlabelled), *QUIET]) == 0
    tuned = root / "ft"
    assert main(["finetune-deletion", "--n-images", "16", "--val-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tuned), *QUIET]) == 0
    return labelled, unlabelled, tuned


def test_evaluate_idsds_and_incremental_deletion(runs):
    run, _, tuned = runs
    assert main(["evaluate", str(run), "--idsds", "--checkpoint", str(tuned), "--id-steps",
                 "3", "--id-order", "descending", "--id-update-attribution", *QUIET]) == 0
    tables = json.loads((run / "evaluation.json").read_text())["tables"]
    for title in ("Evaluation: IDSDS ρ", "IDSDS (Hesse et al. 2024) and single deletion",
                  "Evaluation: incremental deletion, most relevant first"):
        assert title in tables
    body = tables["IDSDS (Hesse et al. 2024) and single deletion"]["rows"]
    assert [r[0] for r in body] == ["attention_rollout", "integrated_gradients"]
    assert all(-1 <= float(r[1]) <= 1 and r[-1] == "2" for r in body)
    assert "IDSDS (Hesse et al. 2024)" in (run / "report.md").read_text()


@pytest.mark.parametrize(("which", "argv", "message"), [
    ("run", ["--idsds"], "--idsds needs --checkpoint"),
    ("run", ["--idsds", "--checkpoint", "{tuned}", "--grid", "5"],
     "a 5×5 grid does not tile 224×224 images"),
    ("run", ["--idsds", "--checkpoint", "{tuned}", "--grid", "2"], "was fine-tuned deleting "
     "cells of a 4×4 grid with baseline 'zeros'"),
    ("run", ["--idsds", "--checkpoint", "{tuned}", "--baseline", "image_mean"],
     "IDSDS deletes cells with baseline zeros, uniform or blur"),
    ("run", ["--idsds", "--checkpoint", "{other}"], "fine-tunes 'vit_tiny_patch16_224', not "
     "this run's model 'vitxai-benchmark-vit'"),
    ("run", ["--idsds", "--checkpoint", "{alien}"], "does not match model "
     "'vitxai-benchmark-vit'"),
    ("folder", ["--idsds", "--checkpoint", "{tuned}"], "IDSDS explains the ground-truth "
     "label, but 1 of the run's 1 images have none"),
])
def test_evaluate_idsds_refusals_are_one_line(runs, tmp_path, capsys, which, argv, message):
    run, folder, tuned = runs
    # a card naming another base model; weights of another architecture under a bundled card
    other, alien = tmp_path / "other", tmp_path / "alien"
    for out in (other, alien):
        out.mkdir()
    card = json.loads((tuned / finetune.CARD).read_text())
    save_file({k: v.contiguous() for k, v in tiny_vit().model.state_dict().items()},
              str(alien / finetune.WEIGHTS))
    data = (alien / finetune.WEIGHTS).read_bytes()
    (alien / finetune.CARD).write_text(json.dumps(
        {**card, "weights": {**card["weights"], "sha256": hashlib.sha256(data).hexdigest()}}))
    card["base_model"]["adapter"] = "vit_tiny_patch16_224"
    (other / finetune.CARD).write_text(json.dumps(card))
    (other / finetune.WEIGHTS).write_bytes((tuned / finetune.WEIGHTS).read_bytes())
    argv = [a.format(tuned=tuned, other=other, alien=alien) for a in argv]
    target = run if which == "run" else folder
    assert main(["evaluate", str(target), *argv, *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitxai: error: ") and "\n" not in err and message in err, err


def test_finetune_refusals_are_one_line(runs, tmp_path, capsys):
    _, _, tuned = runs
    for argv, message in (
            (["--grid", "5", "--out", str(tmp_path / "g5")],
             "a 5×5 grid does not tile 224×224 images"),
            (["--grid", "0"], "--grid must be at least 1"),
            (["--out", str(tuned), "--epochs", "2"], "holds a fine-tuning with other data, "
             "model or settings")):
        assert main(["finetune-deletion", "--n-images", "4", "--val-size", "2", *argv,
                     *QUIET]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitxai: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "g5").exists()
