"""The command line: demo (the README's main job), quantize a saved pipeline, inspect its plan."""

import json

from fxquant.cli import main


def test_demo_writes_table_and_json(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| w8a8 |" in printed and "| w8a8-static |" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = {row["recipe"]: row for row in result["rows"]}
    assert set(rows) == {"full precision", "w8a8", "w8a8-static"}
    for recipe in ("w8a8", "w8a8-static"):
        assert rows[recipe]["psnr_db"] > 30
        assert rows[recipe]["denoiser_rel_l2"] < 0.02
        assert rows[recipe]["denoiser_bytes"] < 0.5 * rows["full precision"]["denoiser_bytes"]  # fp32 -> int8


def test_quantize_then_inspect(demo_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n\na dog in the park\n")
    out = tmp_path / "ckpt"
    assert main(["quantize", "--pipeline", str(demo_pipeline_dir), "--recipe", "w8a8-static", "--prompts",
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
