"""KernelBadness on fake trees: the kernel's formula and its totalpages per scope."""

from __future__ import annotations

import pytest

from oomkit import Candidate, ConfigError, Event, Scope
from oomkit.testing import FakeCgroups, FakeProc
from oomkit_plugins.kernel_badness import KernelBadness

from .support import config, configured

GiB, MiB = 1 << 30, 1 << 20


def scores(plugin: KernelBadness, cands: list[Candidate], scope: Scope = Scope()) -> list[float]:
    return plugin.oomkit_score(Event(source="t", kind="oom", scope=scope), cands)


@pytest.fixture
def plugin(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> KernelBadness:
    fake_proc.set_meminfo(mem_total=8 * GiB, mem_available=4 * GiB)
    return configured(KernelBadness(), config(fake_proc, fake_cgroups))


def test_system_score_is_the_share_of_ram_plus_swap_in_permille(plugin: KernelBadness, fake_proc: FakeProc) -> None:
    fake_proc.set_meminfo(mem_total=6 * GiB, mem_available=GiB, swap_total=2 * GiB, swap_free=2 * GiB)
    cands = [
        Candidate(pid=1, name="a", rss_bytes=GiB, start_ticks=1000),
        Candidate(pid=2, name="b", rss_bytes=GiB, swap_bytes=GiB, start_ticks=1000),
        Candidate(pid=3, name="c", rss_bytes=GiB, pgtables_bytes=GiB, start_ticks=1000),
        Candidate(pid=4, name="d", rss_bytes=8 * GiB, start_ticks=1000),
    ]
    assert scores(plugin, cands) == [125.0, 250.0, 250.0, 1000.0]


def test_adj_is_scaled_by_totalpages_over_1000_with_integer_division(plugin: KernelBadness) -> None:
    total = 8 * GiB // 4096  # 2097152 pages; the kernel's adj unit is 2097 pages, not 2097.152
    cands = [
        Candidate(pid=1, name="a", oom_score_adj=500, start_ticks=1000),
        Candidate(pid=2, name="b", rss_bytes=GiB, oom_score_adj=-500, start_ticks=1000),
        Candidate(pid=3, name="c", rss_bytes=GiB, oom_score_adj=-1000, start_ticks=1000),
    ]
    got = scores(plugin, cands)
    assert got[0] == 500 * (total // 1000) * 1000 / total
    assert got[1] == (total // 8 - 500 * (total // 1000)) * 1000 / total
    assert got[2] < 0


def test_sizes_are_counted_in_whole_pages(plugin: KernelBadness) -> None:
    total = 8 * GiB // 4096
    cand = Candidate(pid=1, name="a", rss_bytes=4096 * 3 + 100, swap_bytes=4095, pgtables_bytes=8192, start_ticks=1000)
    assert scores(plugin, [cand]) == [5 * 1000 / total]


def test_adj_can_be_ignored(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.set_meminfo(mem_total=8 * GiB, mem_available=4 * GiB)
    plugin = configured(KernelBadness(), config(fake_proc, fake_cgroups, kernel_badness={"honour_oom_score_adj": False}))
    assert scores(plugin, [Candidate(pid=1, name="a", rss_bytes=GiB, oom_score_adj=900, start_ticks=1000)]) == [125.0]


def test_v1_scope_scales_by_the_memcg_limit(plugin: KernelBadness, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=GiB)
    got = scores(plugin, [Candidate(pid=1, name="a", rss_bytes=512 * MiB, oom_score_adj=100, start_ticks=1000)], Scope("v1", "/jobs"))
    total = GiB // 4096
    assert got == [(total // 2 + 100 * (total // 1000)) * 1000 / total]


def test_v1_swap_part_comes_from_memsw_capped_at_the_machines_swap(
    plugin: KernelBadness, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_proc.set_meminfo(mem_total=8 * GiB, mem_available=4 * GiB, swap_total=GiB, swap_free=GiB)
    d = fake_cgroups.mkdir_v1("/jobs", limit=GiB)
    (d / "memory.memsw.limit_in_bytes").write_text(f"{GiB + 512 * MiB}\n")
    assert plugin.total_pages(Scope("v1", "/jobs")) == (GiB + 512 * MiB) // 4096
    (d / "memory.memsw.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # unlimited: the machine's swap
    assert plugin.total_pages(Scope("v1", "/jobs")) == 2 * GiB // 4096
    (d / "memory.swappiness").write_text("0\n")  # this memcg never swaps
    assert plugin.total_pages(Scope("v1", "/jobs")) == GiB // 4096


def test_v1_without_swap_accounting_may_use_all_swap(
    plugin: KernelBadness, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_proc.set_meminfo(mem_total=8 * GiB, mem_available=4 * GiB, swap_total=GiB, swap_free=GiB)
    fake_cgroups.mkdir_v1("/jobs", limit=GiB)  # no memory.memsw.* files
    assert plugin.total_pages(Scope("v1", "/jobs")) == 2 * GiB // 4096


def test_unlimited_memcg_scales_like_the_system(plugin: KernelBadness, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/free")  # limit PAGE_COUNTER_MAX
    fake_cgroups.mkdir_v1("/big", limit=64 * GiB)  # more than RAM: never reached
    assert plugin.total_pages(Scope("v1", "/free")) == plugin.total_pages(Scope()) == 8 * GiB // 4096
    assert plugin.total_pages(Scope("v1", "/big")) == 8 * GiB // 4096


def test_v2_scope_reads_memory_max_and_swap_max(plugin: KernelBadness, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.set_meminfo(mem_total=8 * GiB, mem_available=4 * GiB, swap_total=GiB, swap_free=GiB)
    d = fake_cgroups.mkdir_v2("/svc")
    scope = Scope("v2", "/svc")
    assert plugin.total_pages(scope) == 9 * GiB // 4096  # no memory controller: no limit
    (d / "memory.max").write_text("max\n")
    assert plugin.total_pages(scope) == 9 * GiB // 4096
    (d / "memory.max").write_text(f"{GiB}\n")
    assert plugin.total_pages(scope) == 2 * GiB // 4096  # no memory.swap.max: all the swap
    (d / "memory.swap.max").write_text(f"{256 * MiB}\n")
    assert plugin.total_pages(scope) == (GiB + 256 * MiB) // 4096
    (d / "memory.swap.max").write_text("max\n")
    assert plugin.total_pages(scope) == 2 * GiB // 4096


def test_ranking_depends_on_the_scope(plugin: KernelBadness, fake_cgroups: FakeCgroups) -> None:
    # adj is worth far more memory on a machine than in a small memcg, as in the kernel.
    fake_cgroups.mkdir_v1("/small", limit=256 * MiB)
    big = Candidate(pid=1, name="big", rss_bytes=150 * MiB, start_ticks=1000)
    adjusted = Candidate(pid=2, name="adjusted", rss_bytes=10 * MiB, oom_score_adj=300, start_ticks=1000)
    system = scores(plugin, [big, adjusted])
    memcg = scores(plugin, [big, adjusted], Scope("v1", "/small"))
    assert system[1] > system[0]
    assert memcg[0] > memcg[1]


def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc) -> None:
    with pytest.raises(ConfigError) as info:
        configured(KernelBadness(), config(fake_proc, kernel_badness={"honour_adj": True}))
    assert str(info.value) == (
        "/etc/oomkit/test.toml: Object contains unknown field `honour_adj` - at `$.plugins.kernel_badness`"
    )
