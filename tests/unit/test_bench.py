"""The benchmarks cannot rot: every module imports, and the cheap ones run in a tiny size."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bench.__main__ import ALL


@pytest.mark.parametrize("name", [*ALL, "report", "peers", "native", "tracing", "stats"])
def test_imports(name: str) -> None:
    importlib.import_module(f"bench.{name}")


def test_selection_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import selection

    selection.main(["--sizes", "5", "--repeat", "2"])
    out = capsys.readouterr().out
    assert "fake /proc, 5" in out and "real /proc" in out


def test_bus_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bus

    bus.main(["--events", "300", "--decisions", "2"])
    out = capsys.readouterr().out
    assert all(loop in out for loop in ("asyncio", "uvloop", "trio"))


def test_nohang_patch_is_generated_not_kept(tmp_path: Path) -> None:
    from bench import peers

    if peers.skip_reason("nohang"):
        pytest.skip(str(peers.skip_reason("nohang")))
    argv = peers.nohang_command(tmp_path, 1 << 20)
    patched = Path(argv[1]).read_text()
    assert "mem_total * 1.0" in patched and "mem_total * 0.5 or mem_min_kb" not in patched
    assert "@BADNESS_ADJ_RE_NAME 1000 /// ^benchhog$" in Path(argv[-1]).read_text()


def test_report_update_replaces_or_inserts_one_section() -> None:
    from bench.report import update

    doc = "# Benchmarks\n\nheader\n\n# `memcg_oom`\n\nold oom\n# inner heading\n\n# `threshold`\n\nold threshold\n"
    new = update(doc, {"memcg_oom": "# `memcg_oom`\n\nnew oom\n", "kernel_page": "# `kernel_page`\n\nkp\n"})
    assert new == ("# Benchmarks\n\nheader\n\n# `memcg_oom`\n\nnew oom\n\n# `kernel_page`\n\nkp\n\n"
                   "# `threshold`\n\nold threshold\n")
