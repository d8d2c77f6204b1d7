"""The command line: demo (the README's main job), quantize a saved pipeline, inspect its plan."""

import json

from fxquant.cli import main
from fxquant.plan import QuantPlan


def test_demo_writes_table_json_and_grids(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples", "3", "--calibration", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| t2i-dit | w8a8 |" in printed and "| t2i-dit | w8a8-static |" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = {row["recipe"]: row for row in result["rows"]}
    assert set(rows) == {"fp", "w8a8", "w8a8-static"}
    for recipe in ("w8a8", "w8a8-static"):
        assert rows[recipe]["psnr_db"] > 30, rows[recipe]
        assert rows[recipe]["weight_bytes"] < 0.5 * rows["fp"]["weight_bytes"]  # float32 -> int8
        assert (tmp_path / f"t2i-dit-{recipe}.png").exists()


def test_quantize_then_inspect(tiny_pipeline_dir, tmp_path, capsys):
    """`fxquant quantize` on a diffusers pipeline directory (the tiny PixArt-alpha pipeline), then `inspect`."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n\na dog in the park\n")
    out = tmp_path / "ckpt"
    assert main(["quantize", "--pipeline", str(tiny_pipeline_dir), "--recipe", "w8a8-static", "--prompts",
                 str(prompts), "--steps", "2", "--out", str(out), "--pipe-arg", "height=32", "--pipe-arg", "width=32",
                 "--pipe-arg", "use_resolution_binning=false", "--pipe-arg", "max_sequence_length=16",
                 "--pipe-arg", "clean_caption=false"]) == 0
    assert (out / "plan.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "static_per_tensor" in summary and "recipe w8a8-static" in summary


def test_inspect_missing_plan_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "No plan at" in capsys.readouterr().err


def test_quantize_then_export_onnx(tiny_pipeline_dir, tmp_path, capsys):
    """`fxquant export-onnx` records example inputs from a pipeline call and writes an integer-op ONNX graph."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    pipe_args = ["--pipe-arg", "height=32", "--pipe-arg", "width=32", "--pipe-arg", "use_resolution_binning=false",
                 "--pipe-arg", "max_sequence_length=16", "--pipe-arg", "clean_caption=false"]
    checkpoint, out = tmp_path / "ckpt", tmp_path / "model.onnx"
    assert main(["quantize", "--pipeline", str(tiny_pipeline_dir), "--prompts", str(prompts), "--steps", "2",
                 "--out", str(checkpoint), *pipe_args]) == 0
    capsys.readouterr()
    assert main(["export-onnx", "--pipeline", str(tiny_pipeline_dir), "--checkpoint", str(checkpoint), "--out",
                 str(out), *pipe_args]) == 0
    assert out.exists()
    quantized = len(QuantPlan.from_json((checkpoint / "plan.json").read_text()).quantized_layers())
    assert f"({quantized} integer matmul / conv ops" in capsys.readouterr().out
