"""What a guest boot needs, prepared once into a cache under the checkout (``.cache/guest``).

- the kernel: Debian's newest ``linux-image-6.1.0-N-amd64`` that apt knows, fetched with
  ``apt-get download`` (never installed on the host) and unpacked with ``dpkg-deb -x``; the
  uncompressed ``vmlinux`` inside its bzImage boots about 4 s faster under TCG (QEMU loads
  it through its PVH entry point; nothing to decompress in emulation);
- the few modules the guest needs (9p, virtio-pci, virtio-console, overlay, and zram for
  when a test asks for it) with their dependencies, read from each module's ``.modinfo``
  (the package ships no ``modules.dep``: depmod runs at install time);
- an initramfs (newc cpio written here): the host's static busybox, ``init.sh`` and the
  modules in load order.

The cache pins the kernel: once one is prepared, nothing asks apt again (no network at test
time); remove ``.cache/guest`` to move to a newer one.  Whatever cannot be had raises
:class:`Unavailable` with the reason and the command that fixes it: the tests skip with it.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Image", "Unavailable", "prepare", "CACHE"]

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "guest"
PACKAGE = re.compile(r"^linux-image-(6\.1\.0-\d+-amd64)$")
MODULES = ("9p", "9pnet_virtio", "virtio_pci", "virtio_console", "overlay", "zram")
"""Loaded in this order, each after its dependencies; init.sh skips zram unless asked."""
INIT = Path(__file__).with_name("init.sh")


class Unavailable(Exception):
    """The guest cannot be had on this machine; the message says why and what fixes it."""


@dataclass(frozen=True)
class Image:
    qemu: str
    kernel: Path
    initrd: Path
    release: str  # e.g. 6.1.0-50-amd64


def prepare(cache: Path = CACHE) -> Image:
    """Find QEMU and busybox, fetch and unpack the kernel if the cache has none, build the
    initramfs if its inputs changed.  Raises :class:`Unavailable`."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise Unavailable("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    busybox = _static_busybox()
    cache.mkdir(parents=True, exist_ok=True)
    kdir = _cached_kernel(cache) or _fetch_kernel(cache)
    return Image(qemu, kdir / "vmlinux", _initrd(cache, kdir, busybox), kdir.name)


# --- host tools ---------------------------------------------------------------------------


def _static_busybox() -> Path:
    seen = []
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file():
            path = Path(candidate).resolve()
            if not _has_interpreter(path.read_bytes()):
                return path
            seen.append(str(path))
    found = f" ({', '.join(seen)} is dynamically linked)" if seen else ""
    raise Unavailable(f"no static busybox for the initramfs{found}: apt-get install busybox-static")


def _has_interpreter(elf: bytes) -> bool:
    """Whether an ELF64 executable names a dynamic loader (a PT_INTERP program header)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} not found (a Debian host is needed to fetch the guest kernel)") from None


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not ln.startswith("W:")]
    return lines[-1] if lines else f"exit status {proc.returncode}"


# --- the kernel ---------------------------------------------------------------------------


def _release_key(release: str) -> int:
    return int(release.split("-")[1])


def _cached_kernel(cache: Path) -> Path | None:
    ready = [d for d in cache.glob("6.1.0-*-amd64") if (d / "ready").exists()]
    return max(ready, key=lambda d: _release_key(d.name)) if ready else None


def _newest_package() -> str:
    for attempt in range(2):
        found = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
        names = [m.group(0) for ln in found.stdout.splitlines() if (m := PACKAGE.match(ln.split(" ")[0]))]
        if names:
            return max(names, key=lambda n: _release_key(n.removeprefix("linux-image-")))
        if attempt == 0:
            _run(["apt-get", "update", "-q"])  # a fresh machine may have no package lists
    raise Unavailable("apt-cache lists no linux-image-6.1.0-*-amd64 package even after apt-get update")


def _fetch_kernel(cache: Path) -> Path:
    package = _newest_package()
    release = PACKAGE.match(package).group(1)  # type: ignore[union-attr]
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        got = _run(["apt-get", "download", package], cwd=cache)
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            raise Unavailable(f"apt-get download {package} failed: {_last_line(got)}")
    work = cache / f"unpack-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        got = _run(["dpkg-deb", "-x", str(debs[-1]), str(work)])
        if got.returncode != 0:
            raise Unavailable(f"dpkg-deb -x {debs[-1].name} failed: {_last_line(got)}")
        kdir = cache / release
        shutil.rmtree(kdir, ignore_errors=True)
        (kdir / "modules").mkdir(parents=True)
        bzimage = work / "boot" / f"vmlinuz-{release}"
        (kdir / "vmlinux").write_bytes(_vmlinux(bzimage.read_bytes()))
        order = _copy_modules(work / "lib" / "modules" / release / "kernel", kdir / "modules")
        (kdir / "modules" / "order").write_text("".join(f"{m}\n" for m in order))
        (kdir / "ready").write_text(debs[-1].name + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kdir


def _vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an xz-compressed bzImage (Debian's), or the bzImage itself."""
    at = bzimage.find(b"\xfd7zXZ\x00")
    if at >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(bzimage[at:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
    return bzimage  # boots too, only slower


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` ELF section."""
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[strtab + name : ko.index(b"\0", strtab + name)] == b".modinfo":
            for entry in ko[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
    return []


def _copy_modules(tree: Path, dest: Path) -> list[str]:
    """Copy :data:`MODULES` and their dependencies; return file names in load order."""
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in tree.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str) -> None:
        if f"{name}.ko" in order:
            return
        try:
            path = by_name[name.replace("-", "_")]
        except KeyError:
            raise Unavailable(f"module {name} is missing from {tree}") from None
        ko = path.read_bytes()
        for dep in _modinfo_depends(ko):
            visit(dep)
        (dest / f"{name}.ko").write_bytes(ko)
        order.append(f"{name}.ko")

    for module in MODULES:
        visit(module)
    return order


# --- the initramfs ------------------------------------------------------------------------


def _initrd(cache: Path, kdir: Path, busybox: Path) -> Path:
    modules = kdir / "modules"
    order = (modules / "order").read_text().split()
    files = {
        "bin/busybox": (busybox.read_bytes(), 0o755),
        "init": (INIT.read_bytes(), 0o755),
        "modules/order": ((modules / "order").read_bytes(), 0o644),
        **{f"modules/{m}": ((modules / m).read_bytes(), 0o644) for m in order},
    }
    digest = hashlib.sha256()
    for name, (data, _) in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    path = cache / f"initrd-{kdir.name}-{digest.hexdigest()[:12]}.cpio"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(_cpio(files))
        os.replace(tmp, path)
        for old in cache.glob(f"initrd-{kdir.name}-*.cpio"):
            if old != path:
                old.unlink()
    return path


def _cpio(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A newc archive: directories, ``dev/console`` (the kernel opens it for init's output),
    then ``files``.  Device nodes cost no privilege here: they are only bytes."""
    out = bytearray()
    ino = 0

    def entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        ino += 1
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for d in ("bin", "dev", "proc", "sys", "modules"):
        entry(d, 0o040755)
    entry("dev/console", 0o020600, rdev=(5, 1))
    for name, (data, perm) in sorted(files.items()):
        entry(name, 0o100000 | perm, data)
    entry("TRAILER!!!", 0)
    return bytes(out)
