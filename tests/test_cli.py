"""The command line's contract for mistakes a user can fix: each class ends in one line,
`pixelray COMMAND: error: ...`, exit status 2, and no traceback; options come from the configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pixelray.cli import build_parser, main
from pixelray.pipelines.config import CaptionConfig
from pixelray.testing.images import write_folder

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "train_jobs" / "configs" / "debug.yaml"


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `pixelray argv...` in this process; its stderr must be one error line and its status 2."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pixelray {argv[0]}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_folder(folder, n_good=2, bad=False)
    (folder / "notes.md").unlink()
    return folder


def test_bad_values_and_options_name_the_option(capsys, images, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert one_error_line(capsys, ["embed", str(images), *out, "--batch-size", "0"]).endswith(
        "--batch-size: Input should be greater than or equal to 1")
    assert "--max-tokens: Input should be less than or equal to 8192" in one_error_line(
        capsys, ["caption", str(images), *out, "--max-tokens", "9000"])
    assert "give --question or --questions, not both" in one_error_line(
        capsys, ["caption", str(images), *out, "--question", "a", "--questions", "b"])
    assert "INPUT is required unless --questions" in one_error_line(capsys, ["caption", *out])
    for argv, message in ((["embed", str(images)], "the following arguments are required: --out"),
                          (["caption", str(images), *out, "--device", "gpu"], "invalid choice: 'gpu'"),
                          (["caption", str(images), *out, "--max-tokens", "many"], "invalid int value: 'many'")):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"pixelray {argv[0]}: error: ") and message in err[0], err


def test_missing_inputs_models_and_files(capsys, images, tmp_path, tiny_clip):
    out = ["--out", str(tmp_path / "o")]
    assert "does not exist" in one_error_line(capsys, ["embed", str(tmp_path / "nope"), *out,
                                                       "--encoder", str(tiny_clip)])
    assert "unknown model 'no-such-model'" in one_error_line(capsys, ["caption", str(images), *out,
                                                                      "--model", "no-such-model"])
    # a hub model that is not in the (offline) cache: the command that fetches it, on the same line
    assert "huggingface-cli download org/not-cached" in one_error_line(
        capsys, ["caption", str(images), *out, "--model", "org/not-cached"])
    assert "No such file" in one_error_line(capsys, ["train", "--config", str(tmp_path / "none.yaml")])
    assert "override 'stages.9.lr=1' does not apply" in one_error_line(
        capsys, ["train", "--config", str(DEBUG), "stages.9.lr=1"])
    assert "stages.0.lr: Input should be greater than 0" in one_error_line(
        capsys, ["train", "--config", str(DEBUG), "stages.0.lr=-1"])
    assert "give PREDICTIONS --references FILE" in one_error_line(capsys, ["eval"])
    assert "key=value arguments go with the app builder" in one_error_line(
        capsys, ["serve", "--config", "x.yaml", "models=a"])
    assert "needs a JOB id" in one_error_line(capsys, ["jobs", "logs"])
    # the vllm engine's mistakes: a setting it does not have, tensor parallelism on another engine
    assert "unknown setting 'max_imgs'" in one_error_line(
        capsys, ["caption", str(images), *out, "--model", f"vllm:{tiny_clip}?max_imgs=2"])
    assert "--tensor-parallel-size is for the vllm engine" in one_error_line(
        capsys, ["caption", str(images), *out, "--tensor-parallel-size", "2"])


def test_store_mistakes(capsys, ray_address, images, tmp_path, tiny_clip):
    out = str(tmp_path / "store")
    assert main(["embed", str(images), "--out", out, "--encoder", str(tiny_clip), "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert "pass --resume to continue it or --overwrite" in one_error_line(
        capsys, ["embed", str(images), "--out", out, "--encoder", str(tiny_clip)])
    assert "cannot resume" in one_error_line(
        capsys, ["embed", str(images), "--out", out, "--encoder", str(tiny_clip), "--resume", "--patches"])


def test_hardware_the_cluster_does_not_have(capsys, ray_address, images, tmp_path, tiny_clip, tiny_llava):
    """--device cuda on a cluster without GPUs, an MLX model on one without MLX nodes: at once, one line."""
    assert "--device cuda was asked for but the Ray cluster has no GPUs" in one_error_line(
        capsys, ["embed", str(images), "--out", str(tmp_path / "a"), "--encoder", str(tiny_clip), "--device", "cuda",
                 "--address", ray_address])
    assert "this Ray cluster has no MLX node" in one_error_line(
        capsys, ["caption", str(images), "--out", str(tmp_path / "b"), "--model", f"mlx:{tiny_llava}",
                 "--address", ray_address])


def test_no_dashboard_is_one_line_from_a_real_process():
    """As a user sees it: a separate process, nothing listening at the address."""
    result = subprocess.run([sys.executable, "-m", "pixelray.cli", "jobs", "list", "--address", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("pixelray jobs: error: Failed to connect to Ray at address: http://127.0.0.1:9")


def test_options_are_made_from_the_configs():
    """Each described config field is an option with the config's own default, bounds and choices."""
    args = build_parser().parse_args(["caption", "imgs", "--out", "o", "--max-tokens", "7", "--stop", "a",
                                      "--stop", "b", "--dtype", "bf16", "--resume"])
    from pixelray.cli import CAPTION

    cfg = CAPTION.build(args)
    assert (cfg.generation.max_new_tokens, cfg.generation.stop, cfg.dtype, cfg.resume) == (7, ["a", "b"], "bf16", True)
    untouched = CaptionConfig(input="imgs", out="o")
    assert (cfg.batch_size, cfg.model, cfg.prompt) == (untouched.batch_size, untouched.model, untouched.prompt)
    described = {name for name, f in CaptionConfig.model_fields.items() if f.description} - {"generation"}
    assert described <= set(CAPTION.flags) and "max_side" not in CAPTION.flags  # undescribed: not an option
