"""The command line in-process: --config before and after the command, exit codes, summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from regproxy import cli
from regproxy.cli import build_parser, main


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() installs the daemon's log handler on the root logger; not inside pytest."""
    monkeypatch.setattr(cli, "setup_logging", lambda level, fmt: None)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    cfg = tmp_path / "regproxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:31234\nstorage:\n  root: {tmp_path / 'store'}\n  max_size: 2GiB\n"
        "upstreams:\n  docker.io: {}\n"
    )
    return cfg


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{cfg}", "check-config"],
        ["check-config", "--config", "{cfg}"],
        ["-c", "{cfg}", "check-config"],
        ["check-config", "-c", "{cfg}"],
    ],
)
def test_config_before_or_after_the_command(
    argv: list[str], config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.format(cfg=config_file) for a in argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config ok: listen=127.0.0.1:31234 ")
    assert "max_size=2.0 GiB" in out[0] and "upstreams=docker.io" in out[0]
    assert out[1] == "policy: enforce pull-through"


def test_config_after_the_command_wins_over_none_before(config_file: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).config is None
    assert parser.parse_args(["serve", "--config", str(config_file)]).config == str(config_file)
    assert parser.parse_args(["--config", "a", "serve"]).config == "a"
    assert parser.parse_args(["--config", "a", "serve", "-c", "b"]).config == "b"


def test_every_command_takes_config_after_it() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    needs = {"import": ["x.tar"], "export": ["img", "-o", "out.tar"], "pin": ["r"], "unpin": ["r"]}
    for command in sub.choices:
        args = parser.parse_args([command, *needs.get(command, []), "--config", "f.yaml"])
        assert args.config == "f.yaml", command
        assert callable(args.run), command


def test_missing_config_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0]


def test_invalid_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("storage:\n  max_size: lots\n")
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "storage.max_size" in err[0]


def test_containerd_config_dry_run_writes_nothing(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "certs.d"
    argv = ["containerd-config", "--config", str(config_file), "--dir", str(target), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"would be created  {target}/docker.io/hosts.toml" in out
    assert not target.exists()
    assert main(argv[:-1]) == 0
    assert (target / "docker.io" / "hosts.toml").is_file()
    assert main(argv[:-1]) == 0
    assert "nothing changed" in capsys.readouterr().out


def test_pins_of_an_empty_store(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gc", "--config", str(config_file)]) == 0  # makes the store: pins only reads
    assert main(["pins", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0 pinned image(s)"


def test_gc_of_an_empty_store(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gc", "--config", str(config_file)]) == 0
    assert main(["gc", "--dry-run", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.strip()


def test_a_damaged_index_is_one_line_and_exit_1(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the disk may do to any store command is one line naming it, never a traceback."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "index.db").write_bytes(b"not a database at all" * 100)
    for argv in (["gc"], ["fsck"], ["pins"], ["pin", "docker.io/a/b:1"]):
        assert main([*argv, "--config", str(config_file)]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"regproxy {argv[0]}: the metadata index failed: "), err


@pytest.mark.parametrize(
    "argv",
    [["fsck", "--workers", "-5"], ["fsck", "--workers", "0"], ["prefetch", "--attempts", "0", "a"]],
)
def test_counts_below_one_are_a_usage_error(
    argv: list[str], config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a ValueError traceback from the thread pool: argparse's usage line, exit 2."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--config", str(config_file)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not 1 or more" in err and "Traceback" not in err
