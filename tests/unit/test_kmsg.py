"""/dev/kmsg records and the OOM killer's lines, as this machine's kernel printed them."""

from __future__ import annotations

import pytest

from oomkit.kmsg import parse_kill, parse_oom_summary, parse_record

# Copied from this machine's /dev/kmsg after a memcg OOM kill (6.18).
SUMMARY = (b"6,6468,3547425010,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
           b"oom_memcg=/process_api/c07a/oomkit-test-17968-19,task_memcg=/process_api/c07a/oomkit-test-17968-19,"
           b"task=python3,pid=18049,uid=0\n")
KILLED = (b"3,6469,3547425035,-;Memory cgroup out of memory: Killed process 18049 (python3) total-vm:42668kB, "
          b"anon-rss:32512kB, file-rss:6372kB, shmem-rss:0kB, UID:0 pgtables:124kB oom_score_adj:0\n")


def test_record_prefix() -> None:
    rec = parse_record(KILLED)
    assert (rec.prio, rec.seq, rec.ts_us) == (3, 6469, 3547425035)
    assert rec.text.startswith("Memory cgroup out of memory: Killed process 18049")


def test_continuation_lines_are_not_text() -> None:
    rec = parse_record(b"6,1,2,-,caller=T1;hello\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:01.0\n")
    assert rec.text == "hello"


@pytest.mark.parametrize("raw", [b"no prefix at all", b"6,1;short", b"x,1,2,-;text", b"-1,1,2,-;text"])
def test_bad_records(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_record(raw)


def test_killed_process_line() -> None:
    kill = parse_kill(parse_record(KILLED).text)
    assert kill is not None
    assert (kill.pid, kill.comm) == (18049, "python3")
    assert kill.fields == {"total_vm": 42668, "anon_rss": 32512, "file_rss": 6372, "shmem_rss": 0, "uid": 0,
                           "pgtables": 124, "oom_score_adj": 0}


def test_killed_process_with_parentheses_in_comm_and_an_older_kernel() -> None:
    kill = parse_kill("Out of memory: Killed process 7 (a (b) c) total-vm:10kB, anon-rss:4kB, file-rss:0kB, "
                      "shmem-rss:0kB, UID:1000 pgtables:8kB oom_score_adj:-17")
    assert kill is not None and (kill.pid, kill.comm, kill.fields["oom_score_adj"]) == (7, "a (b) c", -17)
    # 4.x printed fewer fields; they are read by name.
    old = parse_kill("Killed process 9 (java) total-vm:100kB, anon-rss:50kB, file-rss:1kB")
    assert old is not None and old.fields == {"total_vm": 100, "anon_rss": 50, "file_rss": 1}
    assert parse_kill("oom_reaper: reaped process 9 (java), now anon-rss:0kB") is None


def test_oom_kill_summary() -> None:
    s = parse_oom_summary(parse_record(SUMMARY).text)
    assert s is not None
    assert (s.pid, s.uid, s.task, s.constraint) == (18049, 0, "python3", "CONSTRAINT_MEMCG")
    assert s.task_memcg == s.oom_memcg == "/process_api/c07a/oomkit-test-17968-19"


def test_oom_kill_summary_with_commas_in_names() -> None:
    s = parse_oom_summary("oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
                          "global_oom,task_memcg=/a,b/c,task=x,y,pid=5,uid=1")
    assert s is not None and (s.task_memcg, s.task, s.pid, s.uid, s.oom_memcg) == ("/a,b/c", "x,y", 5, 1, "")
    assert parse_oom_summary("oom-kill:constraint=CONSTRAINT_NONE,task=x,pid=q,uid=1") is None
