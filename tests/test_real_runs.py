"""Real-data runs without surprises (issue 12): rows say what the model predicted, a model
that looks mismatched is named, a CNN gets methods that run on it, and checkpoints load as
people have them (nested, prefixed, chosen by key; mismatches in one line)."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vitxai.cli import main
from vitxai.compare import CompareSettings, compare, prediction_summary
from vitxai.data.synthetic import SyntheticBenchmark
from vitxai.models import ModelLoadError, load_model
from vitxai.models.bundled import load_bundled_model
from vitxai.runner import SEED_METHODS, default_methods
from vitxai.source import RunSource
from vitxai.store import (
    MANIFEST,
    METHOD_ROWS,
    PAIR_ROWS,
    RunDirectoryError,
    append_csv,
    write_json,
)

AGNOSTIC = ["lime", "kernel_shap", "integrated_gradients", "gradient_shap"]
FAST = ["--param", "lime.n_samples=8", "--param", "kernel_shap.n_samples=8",
        "--param", "integrated_gradients.steps=2", "--param", "gradient_shap.n_samples=2",
        "--segmentation", "algorithm=\"slic\"", "--segmentation", "n_segments=8"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(
            root / f"photo{i}.png")
    return root


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line]


# --- 4. rows say what the model did ---------------------------------------------------------

def _row(index, label, prediction, p, top5="0 1 2 3 4", method="m"):
    return {"index": index, "method": method, "label": label, "prediction": prediction,
            "target_probability": p, "top5": top5}


def test_prediction_summary_accuracy_and_chance():
    rows = [_row(0, 3, 3, 0.9, "3 1 2 0 4"), _row(0, 3, 3, 0.9, "3 1 2 0 4", method="n"),
            _row(1, 2, 4, 0.2, "4 2 1 0 3"), _row(2, 7, 1, 0.1, "1 0 2 3 4")]
    s = prediction_summary(rows, num_classes=10)
    assert s["n_images"] == 3 and s["n_labelled"] == 3  # each image counts once
    assert s["top1_accuracy"] == pytest.approx(1 / 3)
    assert s["top5_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_target_probability"] == pytest.approx(0.4)
    assert s["mismatch"] is None
    # near chance by probability: 1000 classes, explained classes at 0.001
    chance = [_row(i, -1, 5, 0.0012) for i in range(4)]
    s = prediction_summary(chance, num_classes=1000)
    assert s["top1_accuracy"] is None and s["top5_accuracy"] is None
    assert "near chance" in s["mismatch"] and "\n" not in s["mismatch"]
    assert "model name" in s["mismatch"] and "labels" not in s["mismatch"]
    # near chance by accuracy, although the model is confident
    wrong = [_row(i, 1, 2, 0.9) for i in range(20)]
    s = prediction_summary(wrong, num_classes=10)
    assert s["top1_accuracy"] == 0.0 and "top-1 accuracy is 0.0%" in s["mismatch"]
    assert "labels may not be the model's classes" in s["mismatch"]
    # rows written before the top5 column; models without a known class count
    old = [{k: v for k, v in r.items() if k != "top5"} for r in rows]
    assert prediction_summary(old, 10)["top5_accuracy"] is None
    assert prediction_summary(chance, None)["mismatch"] is None


def test_rows_record_top5_and_summary_prints_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--n-images", "3", "--methods", "attention_rollout",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    with (out / METHOD_ROWS).open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        classes = [int(c) for c in r["top5"].split()]
        probs = [float(p) for p in r["top5_probability"].split()]
        assert len(classes) == len(probs) == min(5, load_bundled_model().num_classes)
        assert classes[0] == int(r["prediction"]) and probs == sorted(probs, reverse=True)
    agg = json.loads((out / "aggregates.json").read_text())
    pred = agg["predictions"]
    assert pred["n_images"] == 3 and pred["top1_accuracy"] is not None
    assert "top5" not in agg["subsets"]["all"]["per_method"]["attention_rollout"]
    assert f"top-1 accuracy {pred['top1_accuracy']:.1%}" in printed.out
    assert "top-5" in printed.out and "mean probability of the explained class" in printed.out
    assert "warning" not in printed.err  # the bundled model fits its benchmark


def test_mismatched_model_is_named_in_one_warning(tmp_path, image_dir, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    state = timm.create_model("test_vit").state_dict()
    state["head.weight"].zero_()  # every class equally likely: chance exactly
    save_file(state, str(weights))
    base = ["compare", "--data", str(image_dir), "--model", "test_vit", "--methods",
            "attention_rollout", "--no-progress"]
    assert main([*base, "--checkpoint", str(weights), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr()
    assert "mean probability of the explained class" in printed.out
    assert "accuracy" not in printed.out  # no labels
    warning = [line for line in _lines(printed.err) if "near chance" in line]
    assert len(warning) == 1 and "the model name, its weights (checkpoint) or the " \
        "preprocessing may be wrong" in warning[0]
    # random weights are chance by design: no warning
    assert main([*base, "--random-weights", "--out", str(tmp_path / "b")]) == 0
    assert "may be wrong" not in capsys.readouterr().err


def test_resuming_a_run_of_an_older_version_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    adapter, data = load_bundled_model(), SyntheticBenchmark(size=4)
    settings = CompareSettings(methods=["attention_rollout"], batch_size=2)
    compare(adapter, data, out, settings, progress=False)
    # make it a run an older vitxai interrupted after its first batch: no top5 columns
    with (out / METHOD_ROWS).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["index"]) in (0, 1)]
    old = [{k: v for k, v in r.items() if not k.startswith("top5")} for r in rows]
    (out / METHOD_ROWS).unlink()
    (out / PAIR_ROWS).unlink()
    append_csv(out / METHOD_ROWS, old)
    append_csv(out / PAIR_ROWS, [])
    manifest = json.loads((out / MANIFEST).read_text())
    manifest |= {"done": [0, 1], "complete": False, "maps": {},
                 "committed": {METHOD_ROWS: (out / METHOD_ROWS).stat().st_size,
                               PAIR_ROWS: 0}}
    write_json(out / MANIFEST, manifest)
    with pytest.raises(RunDirectoryError, match="older vitxai; finish it with that version "
                                                "or start afresh with overwrite"):
        compare(adapter, data, out, settings, progress=False)
    # the rows are left as they were
    with (out / METHOD_ROWS).open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    # and via the CLI: one line
    args = ["compare", "--n-images", "4", "--methods", "attention_rollout", "--batch-size", "2",
            "--no-progress", "--out", str(out)]
    # the CLI records its source, so its run is another run: make one, then age it alike
    assert main([*args, "--overwrite"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    (out / METHOD_ROWS).unlink()
    append_csv(out / METHOD_ROWS, old)
    manifest |= {"done": [0, 1], "complete": False, "maps": {},
                 "committed": {METHOD_ROWS: (out / METHOD_ROWS).stat().st_size,
                               PAIR_ROWS: (out / PAIR_ROWS).stat().st_size}}
    write_json(out / MANIFEST, manifest)
    capsys.readouterr()
    assert main(args) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "written by an older vitxai" in err[0], err


def test_append_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    append_csv(path, [{"a": 1, "b": 2}])
    append_csv(path, [{"a": 3, "b": 4}])
    with pytest.raises(RunDirectoryError, match="other columns"):
        append_csv(path, [{"a": 5, "b": 6, "c": 7}])
    assert path.read_text().splitlines() == ["a,b", "1,2", "3,4"]


# --- 5. sensible defaults on a model other than a ViT ---------------------------------------

def test_default_methods_follow_the_model():
    cnn = load_model("test_resnet", pretrained=False)
    assert default_methods(cnn) == AGNOSTIC
    assert default_methods(cnn, ["attention_rollout", "grad_rollout"]) == AGNOSTIC
    assert default_methods(cnn, ["lime", "chefer2021a"]) == ["lime"]
    vit = load_model("test_vit", pretrained=False)
    assert default_methods(vit) == list(SEED_METHODS)


@pytest.mark.parametrize("command", ["compare", "explain"])
def test_cnn_without_methods_runs_the_model_agnostic_ones(command, tmp_path, image_dir,
                                                          capsys):
    model = ["--model", "test_resnet", "--random-weights"]
    if command == "compare":
        args = ["compare", "--data", str(image_dir), *model, *FAST, "--no-progress",
                "--out", str(tmp_path / "run")]
    else:  # explain has no --segmentation: LIME and KernelSHAP keep their superpixels
        args = ["explain", "--image", str(image_dir / "photo0.png"), *model, *FAST[:8],
                "--out", str(tmp_path / "run")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    note = [line for line in _lines(out) if line.startswith("note: test_resnet is not a ViT")]
    assert len(note) == 1 and ", ".join(AGNOSTIC) in note[0]
    if command == "compare":
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert list(config["methods"]) == AGNOSTIC


# --- 6. checkpoints as people have them ------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    return timm.create_model("test_resnet", num_classes=5).state_dict()


def _same(adapter, state) -> bool:
    own = adapter.model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items())


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model.", "backbone."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_wrapper_prefixes_are_stripped(tmp_path, reference, prefix, suffix):
    path = tmp_path / f"w{suffix}"
    state = {prefix + k: v.clone() for k, v in reference.items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    adapter = load_model("test_resnet", checkpoint=path, num_classes=5)
    assert _same(adapter, reference)


@pytest.mark.parametrize("nesting", ["state_dict", "model", "model_ema", "module"])
def test_nested_weights_are_found(tmp_path, reference, nesting):
    path = tmp_path / "w.pth"
    torch.save({nesting: {f"module.{k}": v for k, v in reference.items()}, "epoch": 3}, path)
    assert _same(load_model("test_resnet", checkpoint=path, num_classes=5), reference)


def test_checkpoint_key_chooses_the_entry(tmp_path, reference):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    path = tmp_path / "w.pth"
    torch.save({"model": dict(reference), "model_ema": ema, "epoch": 3}, path)
    assert _same(load_model("test_resnet", checkpoint=path, num_classes=5), reference)
    assert _same(load_model("test_resnet", checkpoint=path, checkpoint_key="model_ema",
                            num_classes=5), ema)
    with pytest.raises(ModelLoadError, match=r"has no entry 'ema'; its entries: model, "
                                             r"model_ema, epoch$"):
        load_model("test_resnet", checkpoint=path, checkpoint_key="ema", num_classes=5)
    with pytest.raises(ModelLoadError, match="entry 'epoch' .* is not a state dict"):
        load_model("test_resnet", checkpoint=path, checkpoint_key="epoch", num_classes=5)
    with pytest.raises(ValueError, match="checkpoint_key='model' needs a checkpoint=PATH"):
        load_model("test_resnet", checkpoint_key="model", pretrained=False)


def test_checkpoint_key_is_recorded_only_when_set():
    assert "checkpoint_key" not in RunSource(model="test_resnet").record()
    record = RunSource(model="test_resnet", checkpoint="w.pth", checkpoint_key="ema").record()
    assert record["checkpoint_key"] == "ema"
    assert RunSource.from_values(record).checkpoint_key == "ema"


def test_mismatched_keys_in_one_line(tmp_path, reference):
    path = tmp_path / "w.safetensors"
    state = {k: v for k, v in reference.items() if not k.startswith("layer1.")}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_model("test_resnet", checkpoint=path, num_classes=5)
    message = str(info.value)
    missing = sum(1 for k in reference if k.startswith("layer1."))
    assert "\n" not in message
    assert f"{missing} missing, 1 unexpected of the model's {len(reference)} keys" in message
    assert "first missing: layer1.0." in message and "first unexpected: extra.weight" in message
    # another number of classes: the shape is named
    with pytest.raises(ModelLoadError, match=r"0 missing, 0 unexpected, 2 of another shape .*"
                                             r"fc\.weight is 5x\d+ in the checkpoint, "
                                             r"1000x\d+ in the model"):
        save_file(dict(reference), str(path))
        load_model("test_resnet", checkpoint=path)


def test_checkpoint_errors_via_the_cli_are_one_line(tmp_path, image_dir, reference, capsys):
    path = tmp_path / "w.pth"
    torch.save({"model": dict(reference), "model_ema": dict(reference)}, path)
    base = ["compare", "--data", str(image_dir), "--model", "test_resnet", "--methods",
            "integrated_gradients", "--param", "integrated_gradients.steps=2",
            "--no-progress", "--out", str(tmp_path / "run"), "--checkpoint", str(path)]
    assert main([*base, "--checkpoint-key", "nope"]) == 2
    err = _lines(capsys.readouterr().err)
    assert err == [f"vitxai: error: checkpoint {path} has no entry 'nope'; its entries: "
                   "model, model_ema"]
    assert main(base) == 2  # 5 classes in the checkpoint, 1000 in the model
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "2 of another shape" in err[0] and "fc.weight" in err[0]
    assert main(["explain", "--image", str(image_dir), "--model", "test_resnet",
                 "--checkpoint-key", "model"]) == 2
    assert _lines(capsys.readouterr().err) == [
        "vitxai: error: --checkpoint-key model needs a --checkpoint PATH"]


def test_checkpoint_recording_another_architecture_warns(tmp_path, reference):
    path = tmp_path / "w.safetensors"
    save_file(dict(reference), str(path), metadata={"arch": "resnet50"})
    with pytest.warns(UserWarning, match="records architecture 'resnet50'"):
        load_model("test_resnet", checkpoint=path, num_classes=5)
    save_file(dict(reference), str(path), metadata={"arch": "test_resnet.r160_in1k"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("test_resnet", checkpoint=path, num_classes=5)
