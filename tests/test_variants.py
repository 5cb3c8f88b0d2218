"""Method variants side by side: labels, presets, precedence, runs that record and rebuild them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import images_for, tiny_vit

from vitxai.cli import main
from vitxai.methods import BatchContext, attribute
from vitxai.methods.variants import IDSDS_PRESETS, MethodChoice, parse_choice
from vitxai.runner import recorded_methods, resolve_methods


def test_labels_names_aliases_variants_and_presets_parse():
    assert parse_choice("IG") == MethodChoice("integrated_gradients", "integrated_gradients", {})
    assert parse_choice(" ig_b = integrated_gradients(baseline=black, steps=8) ") == \
        MethodChoice("ig_b", "integrated_gradients", {"baseline": "black", "steps": 8})
    assert parse_choice("sg=smoothgrad(base='ig', sigma=0.1)").params == {"base": "ig",
                                                                          "sigma": 0.1}
    assert parse_choice("plain=saliency") == MethodChoice("plain", "saliency", {})
    assert parse_choice("idsds:IG-U") == MethodChoice("IG-U", "integrated_gradients_uniform",
                                                      {"draw": "run"})
    assert parse_choice("idsds:RISE-U").params == {"baseline": "uniform_normalized"}


@pytest.mark.parametrize(("text", "match"), [
    ("idsds:IG-X", "unknown preset 'idsds:IG-X'; the IDSDS presets are idsds:IxG"),
    ("a=integrated_gradients(8)", "parameters must look like NAME=VALUE"),
    ("a b=lime", "must look like LABEL=METHOD"),
    ("x=no_such_method", "no_such_method"),
])
def test_bad_labels_are_one_line(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_choice(text)
    assert "\n" not in str(info.value)


def test_every_preset_builds_its_method():
    adapter = tiny_vit()
    resolved = resolve_methods(adapter, [f"idsds:{n}" for n in IDSDS_PRESETS])
    assert list(resolved) == list(IDSDS_PRESETS)
    assert resolved["Rollout"].params.start_layer == 1
    assert resolved["IxG-SG-SQ"].params.transform == "squared"


def test_parameter_precedence_variant_then_label_then_method():
    adapter = tiny_vit()
    resolved = resolve_methods(
        adapter, ["integrated_gradients", "a=integrated_gradients(steps=4)", "b=IG"],
        {"integrated_gradients": {"steps": 6, "baseline": "black"}, "a": {"steps": 9},
         "b": {"steps": 3}})
    assert resolved["integrated_gradients"].params.steps == 6
    assert (resolved["a"].params.steps, resolved["a"].params.baseline) == (4, "black")
    assert resolved["b"].params.steps == 3
    with pytest.raises(ValueError, match="label 'a' names two different configurations"):
        resolve_methods(adapter, ["a=saliency", "a=integrated_gradients"])


def test_ig_u_drawn_once_per_run_is_the_same_baseline_for_every_image():
    adapter = tiny_vit(dtype=torch.float64)
    image = images_for(adapter, 1)
    twice = image.expand(2, -1, -1, -1).clone()
    t = torch.tensor([3, 3])
    for draw, same in (("run", True), ("image", False)):
        ctx = BatchContext.for_batch(2, seed=5, image_ids=[10, 20])
        maps = attribute("integrated_gradients_uniform", adapter, twice, t, context=ctx,
                         draw=draw, steps=8).maps
        # equal up to float64 rounding (rows of one batch may take other SIMD paths)
        close = torch.allclose(maps[0], maps[1], rtol=1e-9, atol=1e-12 * float(maps.abs().max()))
        assert close == same
        alone = attribute("integrated_gradients_uniform", adapter, twice[1:], t[1:],
                          context=BatchContext.for_batch(1, seed=5, image_ids=[20]),
                          draw=draw, steps=8).maps
        torch.testing.assert_close(alone[0], maps[1], rtol=1e-12, atol=1e-12)


def test_compare_runs_variants_as_columns_and_evaluate_rebuilds_them(tmp_path, monkeypatch):
    monkeypatch.setenv("VITXAI_PROGRESS", "0")
    variants = tmp_path / "variants.txt"
    variants.write_text("# IxG on pixels next to IxG on the normalised input\n"
                        "ixg_px=input_x_gradient(input_space=pixel)\n"
                        "\nidsds:Rollout   # the benchmark's rollout\n")
    out = tmp_path / "run"
    assert main(["compare", "--n-images", "2", "--methods", "input_x_gradient",
                 "attention_rollout", "--variants", str(variants), "--param",
                 "ixg_px.batch_size=3", "--param", "input_x_gradient.batch_size=5",
                 "--save_attr_maps", "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert list(config["methods"]) == ["input_x_gradient", "attention_rollout", "ixg_px",
                                       "Rollout"]
    assert config["variants"] == {"ixg_px": "input_x_gradient",
                                  "Rollout": "attention_rollout"}
    assert config["methods"]["ixg_px"]["batch_size"] == 3
    assert config["methods"]["input_x_gradient"]["batch_size"] == 5
    agg = json.loads((out / "aggregates.json").read_text())
    assert agg["methods"] == list(config["methods"])
    # the variant's maps are the method's with those parameters
    from safetensors.torch import load_file

    from vitxai.source import RunSource

    adapter, dataset, _ = RunSource.from_config(config).load()
    resolved = recorded_methods(adapter, config)
    assert resolved["Rollout"].params.start_layer == 1
    (maps_file,) = (out / "maps").glob("*.safetensors")
    saved = load_file(str(maps_file))
    images = torch.stack([dataset.load(i).image for i in range(2)])
    targets = saved["target"]
    expected = attribute("input_x_gradient", adapter, images, targets,
                         input_space="pixel").maps
    torch.testing.assert_close(saved["ixg_px.map"].float(), expected.float())
    assert not torch.allclose(saved["input_x_gradient.map"].float(), expected.float())
    assert main(["evaluate", str(out), "--steps", "3", "--sanity", "--sanity-images", "1"]) == 0
    tables = json.loads((out / "evaluation.json").read_text())["tables"]
    sanity = next(v for k, v in tables.items() if k.startswith("Sanity"))
    assert [row[0] for row in sanity["rows"]] == agg["methods"]


def test_runs_without_variants_record_no_variants_key(tmp_path):
    out = tmp_path / "run"
    assert main(["compare", "--n-images", "1", "--methods", "saliency", "--no-progress",
                 "--out", str(out)]) == 0
    assert "variants" not in json.loads((out / "config.json").read_text())


def test_bad_variant_is_refused_before_the_model_loads(tmp_path, capsys):
    code = main(["compare", "--methods", "x=integrated_gradients(steps=0)", "--out",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "steps" in err and err.count("\n") == 0
