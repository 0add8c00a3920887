"""procfs.stat_fields: a /proc/PID/stat line's comm and the fields after it."""

from __future__ import annotations

import pytest

from oomkit.procfs import stat_fields

# Fields 3 to 52 of proc(5): the state, then numbers that say which field they are.
TAIL = b"S " + b" ".join(str(i).encode() for i in range(4, 53)) + b"\n"


def line(comm: bytes, tail: bytes = TAIL) -> bytes:
    return b"1234 (" + comm + b") " + tail


def full_split(raw: bytes) -> tuple[str, list[bytes]]:
    """The reference: comm from the first "(" to the last ")", every field split."""
    lpar, rpar = raw.index(b"("), raw.rindex(b")")
    return raw[lpar + 1 : rpar].decode(errors="replace"), raw[rpar + 2 :].split()


@pytest.mark.parametrize("comm", [
    b"a b", b"a) S 1 2", b"((x))", b")", b"(", b") ", b"a) b) c) ", b"x)\n)", b"a\nb", b"\xff\xfe", b"",
    b"123456789012345",
])
def test_any_comm_the_kernel_allows_and_the_fields_after_it(comm: bytes) -> None:
    raw = line(comm)
    got_comm, fields = stat_fields(raw)
    want_comm, want = full_split(raw)
    assert got_comm == want_comm == comm.decode(errors="replace")
    assert fields[:22] == want[:22]  # up to rss, each field on its own
    assert fields[0] == b"S" and fields[6] == b"9" and fields[19] == b"22" and fields[21] == b"24"
    assert len(fields) == 23 and fields[22].split() == want[22:]  # the rest unsplit


def test_a_line_of_exactly_the_fields_read() -> None:
    raw = line(b"x", b" ".join([b"S", *(str(i).encode() for i in range(4, 26))]) + b"\n")
    _, fields = stat_fields(raw)
    assert len(fields) == 23 and int(fields[19]) == 22 and int(fields[21]) == 24 and int(fields[22]) == 25


def test_a_line_cut_short_after_the_comm_has_fewer_fields() -> None:
    comm, fields = stat_fields(b"1 (x) S 1 2")
    assert comm == "x" and fields == [b"S", b"1", b"2"]
    with pytest.raises(IndexError):
        int(fields[19])  # what the callers read, and catch
    assert stat_fields(b"1 (x) ") == ("x", [])


@pytest.mark.parametrize("raw", [
    b"", b"1", b"1 (x", b"1 x)", b"1 (x)", b"1 (x)\n", b"1 (x)S 4 5 6", b")(", b"1 )x( S " + b"1 " * 30,
    b"1 (a) b)c 4 5",
])
def test_what_is_not_a_stat_line_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        stat_fields(raw)
