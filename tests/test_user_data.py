"""Your own photos: preprocessing options, labels/targets files, truth masks and boxes."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image, ImageDraw

from vitxai.cli import main
from vitxai.data import FolderDataset, Preprocessing, eval_transform, iter_batches
from vitxai.data.annotations import (
    Box,
    rasterise_boxes,
    read_coco,
    read_voc,
)
from vitxai.source import RunSource

BUNDLED = {"input_size": (3, 224, 224), "mean": [0.5] * 3, "std": [0.25] * 3,
           "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
IMAGENET = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875,
            "crop_mode": "center"}
SEED = 20240


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _voc(path: Path, filename: str, boxes: list[tuple[str, tuple[int, ...]]]) -> None:
    objects = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in boxes)
    path.write_text(f"<annotation><filename>{filename}</filename>{objects}</annotation>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The synthetic benchmark's first four images as PNGs, with masks, boxes in CSV, VOC
    and COCO, labels and class names."""
    from vitxai.data.synthetic import CLASS_NAMES, SyntheticBenchmark

    root = tmp_path_factory.mktemp("user")
    images, masks, voc = root / "photos", root / "masks", root / "voc"
    for d in (images, masks, voc):
        d.mkdir()
    data = SyntheticBenchmark(split="single", size=4, seed=SEED)
    coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "thing"}]}
    box_rows, label_rows = [["file", "x0", "y0", "x1", "y1"]], [["file", "class"]]
    for i in range(len(data)):
        s = data.load(i)
        name = f"img_{i:02d}.png"
        pixels = (s.image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(images / name)
        Image.fromarray(s.mask.numpy().astype(np.uint8) * 255).save(masks / f"img_{i:02d}.png")
        b = _bbox(s.mask.numpy())
        box_rows.append([name, *b])
        label_rows.append([name, s.label])
        _voc(voc / f"img_{i:02d}.xml", name, [("thing", b)])
        coco["images"].append({"id": i + 1, "file_name": name, "width": 224, "height": 224})
        coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 7,
                                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with open(root / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows(box_rows)
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(label_rows)
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "names.txt").write_text("\n".join(CLASS_NAMES[i] for i in range(len(CLASS_NAMES))))
    return root


# --- preprocessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [IMAGENET, BUNDLED,
                                 dict(IMAGENET, input_size=(3, 224, 160), crop_pct=0.9)])
def test_default_transform_is_timms(cfg):
    ref = timm.data.create_transform(input_size=cfg["input_size"], is_training=False,
                                     interpolation=cfg["interpolation"],
                                     crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
                                     mean=(0, 0, 0), std=(1, 1, 1))
    rng = np.random.default_rng(0)
    for w, h in [(300, 200), (224, 224), (97, 411)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(ref(im), eval_transform(cfg)(im))


def test_preprocessing_options():
    im = Image.new("RGB", (300, 200))
    t = eval_transform(IMAGENET, Preprocessing(no_crop=True))
    assert t(im).shape == (3, 224, 224) and t.kept_fraction(300, 200) == 1.0
    assert "no crop" in t.describe()
    t = eval_transform(IMAGENET, Preprocessing(resize=224))  # shorter side 224: crop 300→336
    assert t.resized_size(300, 200) == (224, 336)
    assert math.isclose(t.kept_fraction(300, 200), 224 / 336)
    t = eval_transform(IMAGENET, Preprocessing(crop_pct=1.0, interpolation="nearest"))
    assert t.settings()["crop_pct"] == 1.0 and t.interpolation == "nearest"
    assert "crop_pct 0.875" in eval_transform(IMAGENET).describe()
    for bad in ({"no_crop": True, "crop_pct": 0.9}, {"crop_pct": 1.5}, {"resize": 0},
                {"interpolation": "cubic"}, {"mean": (0.5, 0.5)}, {"std": (1, 0, 1)}):
        with pytest.raises(ValueError) as e:
            Preprocessing(**bad)
        assert "\n" not in str(e.value)


def test_crop_warning_once(tmp_path):
    for i in range(3):
        Image.new("RGB", (224, 224), (i, 0, 0)).save(tmp_path / f"{i}.png")
    ds = FolderDataset(tmp_path, transform=eval_transform(IMAGENET))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(3):
            ds.load(i)
    crop = [x for x in w if "crop removes" in str(x.message)]
    assert len(crop) == 1 and "23 %" in str(crop[0].message)  # 1 - 0.875²
    ds = FolderDataset(tmp_path, transform=eval_transform(IMAGENET, Preprocessing(no_crop=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.load(0)


def test_off_centre_box_transforms_like_the_image(tmp_path):
    """A box rasterised at the original size and transformed equals the transformed image
    of a white box drawn at the same place (crop_pct 0.875 on 300×200)."""
    box = (17, 30, 121, 77)  # x0, y0, x1, y1, exclusive; partly in the cropped border
    im = Image.new("RGB", (300, 200))
    ImageDraw.Draw(im).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill="white")
    t = eval_transform(IMAGENET, Preprocessing(interpolation="nearest"))
    mask = t.mask(rasterise_boxes([Box(*box)], 300, 200))
    assert mask.shape == (224, 224) and mask.any() and not mask.all()
    assert torch.equal(mask, t(im)[0] > 0.5)
    # bilinear image: the mask agrees wherever the resized image is clearly in or out
    x = eval_transform(IMAGENET)(im)[0]
    clear = (x > 0.9) | (x < 0.1)
    assert torch.equal(mask[clear], (x > 0.5)[clear])
    # through the dataset, from a CSV
    im.save(tmp_path / "p.png")
    (tmp_path / "b.csv").write_text(f"p.png,{','.join(map(str, box))}\n")
    ds = FolderDataset(tmp_path / "p.png", transform=t, boxes=tmp_path / "b.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ds.load(0).mask, mask)


# --- labels, targets, class names -----------------------------------------------------------

def test_labels_targets_and_class_names(folder, tmp_path):
    (tmp_path / "t.csv").write_text("img_01.png,stripes+checker\nphotos/img_02.png,3\n")
    t = eval_transform(BUNDLED)
    ds = FolderDataset(folder / "photos", t, labels=folder / "labels.csv",
                       targets=tmp_path / "t.csv", class_names=folder / "names.txt")
    from vitxai.data.synthetic import CLASS_NAMES, SyntheticBenchmark

    syn = SyntheticBenchmark(split="single", size=4, seed=SEED)
    assert ds.labels == [syn.load(i).label for i in range(4)]
    names = list(CLASS_NAMES.values())
    assert ds.targets == [-1, names.index("stripes+checker"), 3, -1]
    batch = next(iter_batches(ds, range(4), 4, workers=0))
    assert batch.targets.tolist() == ds.targets
    assert ds.describe()["annotations"]["targets"] == str(tmp_path / "t.csv")
    # ImageNet names: short name, synonym, WordNet id
    (tmp_path / "i.csv").write_text("file,class\nimg_00.png,tench\nimg_01.png,Tinca tinca\n"
                                    "img_02.png,n01443537\n")
    ds = FolderDataset(folder / "photos", t, labels=tmp_path / "i.csv")
    assert ds.labels[:3] == [0, 0, 1]


def test_batch_targets_win_over_the_rule(folder, tmp_path):
    from vitxai.models.bundled import load_bundled_model
    from vitxai.runner import resolve_methods, run_batch

    (tmp_path / "t.csv").write_text("img_00.png,5\n")
    ds = FolderDataset(folder / "photos", eval_transform(BUNDLED), targets=tmp_path / "t.csv")
    adapter = load_bundled_model()
    params = resolve_methods(adapter, ["attention_rollout"])
    batch = next(iter_batches(ds, [0, 1], 2, workers=0))
    run = run_batch(adapter, batch, params, target="prediction")
    assert int(run.targets[0]) == 5 and int(run.targets[1]) == int(run.predictions[1])
    assert run_batch(adapter, batch, params, target=2).targets.tolist() == [2, 2]


@pytest.mark.parametrize(("text", "match"), [
    ("img_00.png,1\nnope.png,2\n", r"t\.csv line 2: no image 'nope.png'"),
    ("img_00.png,no such class\n", r"t\.csv line 1: unknown class name 'no such class'"),
    ("img_00.png\n", r"t\.csv line 1: expected 'file,class'"),
    ("img_00.png,1,2\n", r"t\.csv line 1: expected 'file,class'"),
    ("img_00.png,crane\n", r"t\.csv line 1: class name 'crane' is ambiguous"),
])
def test_bad_class_tables(folder, tmp_path, text, match):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        FolderDataset(folder / "photos", eval_transform(BUNDLED), targets=tmp_path / "t.csv")
    assert "\n" not in str(e.value)


def test_class_index_outside_the_names(folder, tmp_path):
    (tmp_path / "t.csv").write_text("img_00.png,10\n")
    with pytest.raises(ValueError, match="outside the 10 class names"):
        FolderDataset(folder / "photos", eval_transform(BUNDLED), labels=tmp_path / "t.csv",
                      class_names=folder / "names.txt")


# --- truth masks and boxes --------------------------------------------------------------------

def _truths(ds) -> torch.Tensor:
    return torch.stack([ds.load(i).mask for i in range(len(ds))])


def test_masks_and_boxes(folder):
    from vitxai.data.synthetic import SyntheticBenchmark

    t = eval_transform(BUNDLED, Preprocessing(no_crop=True))
    syn = SyntheticBenchmark(split="single", size=4, seed=SEED)
    exact = torch.stack([syn.load(i).mask for i in range(4)])
    masks = _truths(FolderDataset(folder / "photos", t, masks=folder / "masks"))
    assert masks.dtype == torch.bool and torch.equal(masks, exact)
    boxes = [_truths(FolderDataset(folder / "photos", t, boxes=folder / b))
             for b in ("boxes.csv", "voc", "coco.json")]
    assert torch.equal(boxes[0], boxes[1]) and torch.equal(boxes[0], boxes[2])
    for i in range(4):
        x0, y0, x1, y1 = _bbox(exact[i].numpy())
        expected = torch.zeros(224, 224, dtype=torch.bool)
        expected[y0:y1, x0:x1] = True
        assert torch.equal(boxes[0][i], expected)
    ds = FolderDataset(folder / "photos", t, masks=folder / "masks")
    assert ds.has_masks and ds.describe()["annotations"]["masks"] == str(folder / "masks")


def test_boxes_of_the_target_class(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    (tmp_path / "b.csv").write_text("a.png,0,0,10,10,tench\na.png,50,50,60,60,goldfish\n")
    t = eval_transform(BUNDLED, Preprocessing(no_crop=True))
    (tmp_path / "l.csv").write_text("a.png,1\n")
    ds = FolderDataset(tmp_path / "a.png", t, boxes=tmp_path / "b.csv", labels=tmp_path / "l.csv")
    both = FolderDataset(tmp_path / "a.png", t, boxes=tmp_path / "b.csv")
    one = rasterise_boxes([Box(50, 50, 60, 60)], 100, 80)
    assert torch.equal(ds.load(0).mask, t.mask(one))
    assert both.load(0).mask.sum() > ds.load(0).mask.sum()  # no class known: all boxes


def test_voc_and_coco_conventions(tmp_path):
    _voc(tmp_path / "a.xml", "a.jpg", [("cat", (0, 0, 5, 7)), ("dog", (2, 3, 4, 5))])
    assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in read_voc(tmp_path / "a.xml")["a.jpg"]] \
        == [(0, 0, 5, 7, "cat"), (2, 3, 4, 5, "dog")]
    (tmp_path / "c.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 1, "bbox": [1.5, 2, 3, 4], "category_id": 3}],
        "categories": [{"id": 3, "name": "cat"}]}))
    (b,) = read_coco(tmp_path / "c.json")["a.jpg"]
    assert (b.x0, b.y0, b.x1, b.y1, b.label) == (1.5, 2, 4.5, 6, "cat")


@pytest.mark.parametrize(("name", "text", "match"), [
    ("b.csv", "a.png,1,2,3\n", r"b\.csv line 1: expected 'file,x0,y0,x1,y1'"),
    ("b.csv", "a.png,1,2,x,4\n", r"b\.csv line 1: x1 'x' is not a number"),
    ("b.csv", "a.png,5,5,5,9\n", r"b\.csv line 1: empty box"),
    ("b.csv", "other.png,1,1,4,4\n", r"b\.csv line 1: no image 'other.png'"),
    ("b.csv", "a.png,200,10,220,20\n", r"b\.csv line 1: box .* lies outside image"),
    ("b.xml", "<annotation><object>", r"b\.xml: malformed XML"),
    ("b.xml", "<annotation><object><name>x</name></object></annotation>",
     r"b\.xml object 1: no <bndbox>"),
    ("b.json", "{\"images\": [", r"b\.json: malformed JSON"),
    ("b.json", "{\"images\": []}", r"b\.json: not a COCO instances file"),
    ("b.json", json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                           "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}),
     r"b\.json annotation 1: image_id 2 is not among the images"),
    ("b.txt", "a.png,1,1,2,2", r"unknown box format"),
])
def test_bad_box_files(tmp_path, name, text, match):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        FolderDataset(tmp_path / "a.png", eval_transform(BUNDLED), boxes=tmp_path / name)
    assert "\n" not in str(e.value)


def test_box_partly_outside_is_clipped_with_a_warning(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    (tmp_path / "b.csv").write_text("a.png,90,70,120,95\n")
    t = eval_transform(BUNDLED, Preprocessing(no_crop=True))
    with pytest.warns(UserWarning, match=r"1 boxes lie partly outside .*b\.csv line 1"):
        ds = FolderDataset(tmp_path / "a.png", t, boxes=tmp_path / "b.csv")
    assert torch.equal(ds.load(0).mask, t.mask(rasterise_boxes([Box(90, 70, 100, 80)], 100, 80)))


def test_bad_masks_and_missing_truth(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for n in ("a", "b", "c"):
        Image.new("RGB", (100, 80)).save(photos / f"{n}.png")
    Image.new("L", (100, 80)).save(masks / "a.png")  # empty
    m = Image.new("L", (100, 80))
    m.paste(255, (10, 10, 20, 20))
    m.save(masks / "b.png")  # c: none
    t = eval_transform(BUNDLED)
    with pytest.warns(UserWarning, match=r"1 of 3 images have no mask or box .*c\.png"):
        ds = FolderDataset(photos, t, masks=masks)
    batch = next(iter_batches(ds, range(3), 3, workers=0))
    assert batch.indices == [1] and batch.masks.shape == (1, 224, 224)
    reasons = {Path(p).name: r for _, p, r in batch.skipped}
    assert "mask" in reasons["a.png"] and "empty" in reasons["a.png"]
    assert "no mask or box" in reasons["c.png"]
    Image.new("L", (50, 50)).save(masks / "c.png")
    with pytest.raises(ValueError, match=r"mask .*c\.png is 50×50 but image .*c\.png is 100×80"):
        FolderDataset(photos, t, masks=masks)
    Image.new("L", (50, 50)).save(masks / "d.png")
    with pytest.raises(ValueError, match=r"d\.png: no image 'd' in"):
        FolderDataset(photos, t, masks=masks)


# --- source records and the command line -------------------------------------------------------

def test_default_source_record_unchanged():
    old = {"data", "split", "n_images", "data_seed", "data_root", "variant", "model",
           "checkpoint", "random_weights", "precision", "device"}
    assert set(RunSource().record()) == old
    rec = RunSource(data="x", no_crop=True, mean=(0.1, 0.2, 0.3), boxes="b.csv").record()
    assert rec["no_crop"] is True and rec["mean"] == [0.1, 0.2, 0.3] and rec["boxes"] == "b.csv"
    back = RunSource.from_config({"source": json.loads(json.dumps(rec))})
    assert back.preprocessing == Preprocessing(no_crop=True, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="need a folder of images"):
        RunSource(masks="m").load_dataset(None)


def _truth_columns(out: Path) -> dict[tuple[int, str], dict[str, str]]:
    with open(out / "per_image_methods.csv") as f:
        rows = list(csv.DictReader(f))
    return {(int(r["index"]), r["method"]): {k: v for k, v in r.items() if k.startswith("truth_")}
            for r in rows}


def test_compare_on_a_folder_equals_the_synthetic_path(folder, tmp_path, capsys):
    common = ["--methods", "attention_rollout", "chefer2021a", "integrated_gradients",
              "--param", "integrated_gradients.steps=8", "--no-progress", "--batch-size", "4"]
    assert main(["compare", "--n-images", "4", "--data-seed", str(SEED),
                 "--out", str(tmp_path / "syn"), *common]) == 0
    assert main(["compare", "--data", str(folder / "photos"), "--model", "bundled",
                 "--no-crop", "--masks", str(folder / "masks"),
                 "--labels", str(folder / "labels.csv"),
                 "--class-names", str(folder / "names.txt"),
                 "--out", str(tmp_path / "mine"), *common]) == 0
    printed = capsys.readouterr().out
    assert "note: preprocessing: resize to exactly 224×224 (bilinear), no crop" in printed
    syn, mine = _truth_columns(tmp_path / "syn"), _truth_columns(tmp_path / "mine")
    assert syn and set(syn) == set(mine)
    assert all(syn[k] == mine[k] for k in syn) and "truth_iou" in syn[(0, "chefer2021a")]
    config = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert config["source"]["no_crop"] is True and "crop_pct" not in config["source"]
    assert any(n.startswith("preprocessing:") for n in config["notes"])
    # the same boxes in all three formats give the same scores
    runs = []
    for b in ("boxes.csv", "voc", "coco.json"):
        out = tmp_path / b.replace(".", "_")
        assert main(["compare", "--data", str(folder / "photos"), "--model", "bundled",
                     "--no-crop", "--boxes", str(folder / b), "--labels",
                     str(folder / "labels.csv"), "--out", str(out), *common]) == 0
        runs.append(_truth_columns(out))
    assert runs[0] == runs[1] == runs[2]


def test_cli_errors_are_one_line(folder, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("img_00.png,nothing\n")
    code = main(["compare", "--data", str(folder / "photos"), "--model", "bundled",
                 "--targets", str(tmp_path / "t.csv"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "t.csv line 1: unknown class name" in err
    code = main(["compare", "--data", str(folder / "photos"), "--model", "bundled",
                 "--no-crop", "--crop-pct", "0.9", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--no-crop excludes" in err
    code = main(["compare", "--masks", str(folder / "masks"), "--out", str(tmp_path / "r")])
    assert code == 2 and "need a folder of images" in capsys.readouterr().err
