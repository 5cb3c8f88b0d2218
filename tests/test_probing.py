"""`vitxai probe`: the fit, the held-out split, the feature cache, the CLI and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitxai.cli import main
from vitxai.models import load_model
from vitxai.models.probe import LinearProbe, load_probe, save_probe
from vitxai.probing import (
    Features,
    fit_multinomial,
    fit_probe,
    folder_class_labels,
    heldout_split,
)


def blobs(n_per: int = 30, classes: int = 3, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    x = torch.cat([c + torch.randn(n_per, dim, generator=g, dtype=torch.float64)
                   for c in centres])
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_logistic_fit_is_sklearns_multinomial_optimum():
    """mean CE + λ/2‖W‖² is scikit-learn's C·ΣCE + ½‖W‖² with C = 1/(λM)."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs()
    lam = 0.05
    w, b = fit_multinomial(x, y, 3, lam)
    ref = LogisticRegression(C=1 / (lam * len(y)), tol=1e-12, max_iter=10_000).fit(x, y)
    ours = torch.softmax(x @ w.T + b, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=1e-5)


def test_fit_probe_separates_blobs_and_unseen_classes_never_win():
    x, y = blobs(classes=3)
    labels = torch.tensor([0, 2, 5])[y]  # sparse label space, as ImageNet indices
    features = Features(x[:, :3].float(), x[:, 3:].float(), labels, torch.full_like(y, -1))
    fit = fit_probe(features, "cls+mean_patch", num_prefix_tokens=1, seed=3)
    assert fit.probe.num_classes == 6 and fit.classes_seen == [0, 2, 5]
    assert fit.heldout_accuracy > 0.9 and fit.train_accuracy > 0.9
    tokens = torch.stack([x[:, :3].float(), x[:, 3:].float()], 1)  # (M, 2, D): cls, 1 patch
    logits = fit.probe(tokens)
    assert set(logits.argmax(1).tolist()) <= {0, 2, 5}
    absent = logits[:, [1, 3, 4]]
    assert (absent.max(1).values < logits[:, [0, 2, 5]].min(1).values).all()
    assert fit.head_heldout_accuracy is None


def test_heldout_split_is_stratified_and_seeded():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, held = heldout_split(y, 0.2, seed=1)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(16))
    assert torch.bincount(y[held], minlength=3).tolist() == [2, 1, 0]
    again = heldout_split(y, 0.2, seed=1)
    assert torch.equal(again[1], held) and not torch.equal(heldout_split(y, 0.2, 2)[1], held)


@pytest.mark.parametrize(("labels", "match"), [
    ([-1, -1, -1, -1], "no labels: give a folder with one subfolder per class"),
    ([4, 4, 4, 4], "one class \\(4\\) only; a probe needs at least two"),
])
def test_fit_probe_bad_labels_are_one_line(labels, match):
    f = Features(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(labels),
                 torch.full((4,), -1))
    with pytest.raises(ValueError, match=match):
        fit_probe(f, "cls", 1)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            colour = (rng.random(3) * 255).astype(np.uint8)
            Image.fromarray(np.tile(colour, (40, 40, 1))).save(root / name / f"{i}.png")
    return root


def test_folder_class_labels_are_sorted_subfolders(tmp_path):
    from vitxai.data import FolderDataset

    root = _folder(tmp_path / "d", {"zebra": 1, "ant": 2})
    ds = FolderDataset(root, transform=lambda im: torch.zeros(3, 8, 8))
    labels, names = folder_class_labels(ds)
    assert names == {0: "ant", 1: "zebra"}
    assert sorted(labels) == [0, 0, 1]


# --- the command, end to end on the bundled model -------------------------------------------

@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Three probes on the bundled model's trunk from one feature extraction."""
    root = tmp_path_factory.mktemp("probes")
    mp = pytest.MonkeyPatch()
    mp.setenv("VITXAI_PROGRESS", "0")
    cards = {}
    for readout in ("cls", "mean_patch", "cls+mean_patch"):
        assert main(["probe", "--n-images", "40", "--readout", readout, "--cache-dir",
                     str(root / "cache"), "--out", str(root / readout)]) == 0
        cards[readout] = json.loads((root / readout / "card.json").read_text())
    mp.undo()
    return root, cards


def test_probe_command_writes_probe_and_card_and_reuses_features(probes):
    root, cards = probes
    assert [c["features"]["reused"] for c in cards.values()] == [False, True, True]
    assert len(list((root / "cache").glob("features-*.safetensors"))) == 1
    for readout, card in cards.items():
        probe, meta = load_probe(root / readout / "probe.safetensors")
        assert probe.readout == readout and meta == card
        assert card["backbone"] == "vitxai-benchmark-vit" and card["img_size"] == [224, 224]
        assert card["num_classes"] == 10 and len(card["classes"]) >= 8  # 40 images
        assert card["heldout_accuracy"] > 0.5 and card["head_heldout_accuracy"] > 0.5
        assert (root / readout / "card.md").read_text().startswith("# Linear probe on")


def test_damaged_feature_cache_is_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("VITXAI_PROGRESS", "0")
    cache = tmp_path / "cache"
    command = ["probe", "--n-images", "12", "--heldout", "0.3", "--cache-dir", str(cache),
               "--out", str(tmp_path / "p")]
    assert main(command) == 0
    (damaged,) = cache.glob("features-*.safetensors")
    damaged.write_bytes(b"not safetensors")
    assert main(command) == 0
    card = json.loads((tmp_path / "p" / "card.json").read_text())
    assert card["features"]["reused"] is False
    assert load_probe(tmp_path / "p" / "probe.safetensors")[0].num_classes == 10


def test_compare_with_probe_records_it_and_evaluate_rebuilds_it(probes, tmp_path, capsys):
    root, _ = probes
    probe = str(root / "mean_patch" / "probe.safetensors")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="the probe replaces 'vitxai-benchmark-vit''s own"):
        code = main(["compare", "--probe", probe, "--methods", "saliency", "chefer2021a",
                     "--n-images", "2", "--out", str(out), "--save_attr_maps"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["probe"] == probe
    assert "linear probe" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert main(["evaluate", str(out), "--steps", "4"]) == 0


def test_headless_model_in_compare_names_vitxai_probe(tmp_path, capsys):
    code = main(["compare", "--model", "vit_small_patch14_dinov2", "--random-weights",
                 "--img-size", "224", "--n-images", "1", "--methods", "saliency",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "no classifier head" in err and "`vitxai probe`" in err and "--probe" in err


def test_probe_of_another_backbone_is_one_line(probes, tmp_path, capsys):
    root, _ = probes
    code = main(["compare", "--model", "vit_small_patch14_dinov2", "--random-weights",
                 "--img-size", "224", "--n-images", "1", "--methods", "saliency",
                 "--probe", str(root / "cls" / "probe.safetensors"),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "reads 64-dimensional tokens but 'vit_small_patch14_dinov2' has 384" in err


def test_probe_file_that_is_not_safetensors_is_one_line(tmp_path, capsys):
    bad = tmp_path / "probe.safetensors"
    bad.write_text("hello")
    code = main(["compare", "--probe", str(bad), "--n-images", "1", "--methods", "saliency",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a safetensors file" in err and err.count("\n") == 0


def test_probe_with_num_classes_is_refused(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    save_probe(path, LinearProbe("cls", 384, 3, 1), {})
    code = main(["compare", "--model", "vit_small_patch14_dinov2", "--random-weights",
                 "--img-size", "224", "--num-classes", "3", "--probe", str(path),
                 "--n-images", "1", "--methods", "saliency", "--out", str(tmp_path / "r")])
    assert code == 2 and "the probe decides the classes" in capsys.readouterr().err


@pytest.mark.parametrize(("classes", "match"), [
    ({"only": 3}, "one class"),
])
def test_probe_command_on_one_class_is_one_line(tmp_path, capsys, monkeypatch, classes, match):
    monkeypatch.setenv("VITXAI_PROGRESS", "0")
    data = _folder(tmp_path / "d", classes)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "b.png")
    for folder, expected in ((data, match), (tmp_path / "flat", "has no labels")):
        code = main(["probe", "--model", "vit_small_patch14_dinov2", "--random-weights",
                     "--img-size", "56", "--data", str(folder), "--cache-dir",
                     str(tmp_path / "c"), "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and err.count("\n") == 0


def test_probe_on_a_folder_of_class_subfolders_explains_the_probed_class(tmp_path, monkeypatch):
    """A headless random DINOv2-style backbone, probed on two colour classes, then explained
    through the Python API: the probed model's logits are the probe's."""
    monkeypatch.setenv("VITXAI_PROGRESS", "0")
    data = _folder(tmp_path / "d", {"a": 6, "b": 6})
    assert main(["probe", "--model", "vit_small_patch14_dinov2", "--random-weights",
                 "--img-size", "56", "--data", str(data), "--readout", "cls+mean_patch",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "p")]) == 0
    card = json.loads((tmp_path / "p" / "card.json").read_text())
    assert card["classes"] == {"0": "a", "1": "b"} and card["num_classes"] == 2
    adapter = load_model("vit_small_patch14_dinov2", pretrained=False, img_size=56,
                         probe=tmp_path / "p" / "probe.safetensors")
    assert adapter.probe.readout == "cls+mean_patch" and adapter.num_classes == 2
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        tokens = adapter.model.forward_features(adapter.normalize(x))
        torch.testing.assert_close(adapter.predict(x), adapter.probe(tokens))


@pytest.mark.parametrize(("name", "kwargs"), [
    ("vit_base_patch14_dinov2.lvd142m", {"img_size": 224}),
    ("vit_base_patch16_224.mae", {}),
    ("vit_base_patch16_clip_224.openai", {}),
])
def test_seed_backbones_load_through_the_probe_path(name, kwargs, tmp_path):
    """The seed's self-supervised checkpoints: offline, the hub weights fail in seconds with one
    line naming --checkpoint; the same path with random weights takes a probe of their width
    (CLIP's 512-d projection head is replaced, with a warning)."""
    path = tmp_path / "p.safetensors"
    save_probe(path, LinearProbe("cls+mean_patch", 768, 4, 1), {"backbone": name})
    with pytest.raises(Exception, match="cannot get pretrained weights.*checkpoint") as info:
        load_model(name, probe=path, **kwargs)
    assert "\n" not in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_model(name, pretrained=False, probe=path, **kwargs)
    assert adapter.probe.readout == "cls+mean_patch" and adapter.num_classes == 4
    assert adapter.grid_size == ((16, 16) if "dinov2" in name else (14, 14))
    replaced = [str(w.message) for w in caught if "replaces" in str(w.message)]
    assert bool(replaced) == ("clip" in name)
    with torch.no_grad():
        assert adapter.predict(torch.rand(1, 3, 224, 224)).shape == (1, 4)
