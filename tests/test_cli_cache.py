"""Bad command lines end in one clear line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest

from sak.cli.cache import main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sak.cli.cache", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--teachers", "dinov3_x", "--source", "."], "unknown teacher 'dinov3_x'; known teachers: clip_b"),
        (["--teachers", "clip_tiny", "--source", "/no/such/folder"], "source /no/such/folder does not exist"),
        (
            ["--teachers", "clip_tiny", "--source", ".", "--out", "/proc/sak-cannot-write"],
            "cannot write to output folder",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, expect):
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    proc = _run("run", *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sak-cache: error: ") and expect in lines[0], proc.stderr


def test_help_teaches(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sak-cache run --source" in out and "verify" in out
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--views-per-image", "--shard-size", "--address", "--weights", "--random-init", "--seed"):
        assert option in out


HELP_IMPORTS = (
    "import sys; from sak.cli.cache import main; code = main(sys.argv[1:]); "
    "print(sorted(m for m in ('torch', 'timm', 'ray', 'zarr') if m in sys.modules)); sys.exit(code)"
)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["estimate"],
        ["inspect"],
        ["show"],
        ["ls"],
        ["verify"],
        ["stage2"],
    ],
)
def test_help_loads_no_torch(command):
    """--help of the command group and of each subcommand, in a fresh interpreter: the options come from
    the config dataclasses, whose modules import neither torch, timm, Ray nor zarr."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS, *command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-300:]


def test_stage2_help_lists_the_options_of_its_source_and_its_build(capsys):
    assert main(["stage2", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--dataset",
        "--init",
        "--teachers",
        "--img-size",
        "--seed",
        "--out",
        "--epochs",
        "--codec",
    ):
        assert option in out
    assert "--workers" in out and "--address" in out and "--scale-range" not in out


def test_bad_weights_syntax_and_shard_size(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert (
        main(["run", "--source", ".", "--out", out, "--teachers", "clip_tiny", "--weights", "clip_tiny"]) == 2
    )
    assert "NAME=PATH" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "--source",
                ".",
                "--out",
                out,
                "--teachers",
                "clip_tiny",
                "--views-per-image",
                "3",
                "--shard-size",
                "10",
            ]
        )
        == 2
    )
    assert "multiple of --views-per-image 3" in capsys.readouterr().err


def test_inspect_of_a_non_cache(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a SAK cache" in capsys.readouterr().err
