"""steady_heap: training's freed memory stays in the process between steps (glibc's malloc),
and goes back to the system when training ends."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from omicvae_sc.train import _heap
from omicvae_sc.train._heap import steady_heap


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_thresholds_are_set_and_memory_handed_back_once_for_nested_blocks(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(_heap, "_glibc", lambda: libc)
    with steady_heap():
        with steady_heap():  # an output chunk loop inside training, say
            pass
        assert ("malloc_trim", 0) not in libc.calls  # not while the outer block runs
    assert libc.calls == [("mallopt", _heap.M_MMAP_THRESHOLD, 32 * 2**20),
                          ("mallopt", _heap.M_TRIM_THRESHOLD, 64 * 2**20),
                          ("malloc_trim", 0)]


def test_memory_is_handed_back_when_training_fails(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(_heap, "_glibc", lambda: libc)
    with pytest.raises(KeyboardInterrupt), steady_heap():
        raise KeyboardInterrupt
    assert libc.calls[-1] == ("malloc_trim", 0)
    with steady_heap():  # the depth went back to zero: a later block sets and trims again
        pass
    assert libc.calls.count(("malloc_trim", 0)) == 2


def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("OMICVAE_SC_TUNE_MALLOC", "0")
    assert _heap._glibc() is None


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    _heap._glibc_library.cache_clear()  # found once per process: look again
    try:
        assert _heap._glibc() is None
    finally:
        _heap._glibc_library.cache_clear()


_ALLOCATOR = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_heap", sys.argv[1])  # no torch, no package:
heap = importlib.util.module_from_spec(spec)                          # a quiet, fresh heap
spec.loader.exec_module(heap)

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 16 << 20  # a step's temporary: above glibc's 128 KiB default, below the 32 MiB set

with heap.steady_heap():
    before = libc.mallinfo2()
    block = libc.malloc(SIZE)
    allocated = libc.mallinfo2()
    libc.free(block)
    freed = libc.mallinfo2()
left = libc.mallinfo2()
print(json.dumps({
    "mapped": allocated.hblks - before.hblks,    # blocks served by mmap of their own
    "heap_grew": allocated.arena - before.arena,  # bytes the heap took from the system
    "kept": freed.arena - before.arena,           # still held once the block is freed
    "handed_back": freed.arena - left.arena,      # returned when the block is left
}))
"""


def _allocator(tune: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["OMICVAE_SC_TUNE_MALLOC"] = tune
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR, _heap.__file__], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="glibc's malloc only (mallinfo2 from 2.33)")
def test_on_glibc_a_freed_step_block_stays_in_the_heap_and_goes_back_at_the_end():
    """The real allocator, read through its own counters (mallinfo2), not a clock: inside the
    block a 16 MiB allocation comes from the heap and stays there once freed; leaving the
    block hands it back. Fresh processes, whose heaps have no history of large frees."""
    size = 16 << 20
    off = _allocator("0")  # glibc's defaults, the control: a block of its own, unmapped on free
    assert off["mapped"] == 1 and off["heap_grew"] < size, off
    on = _allocator("1")
    assert on["mapped"] == 0 and on["heap_grew"] >= size, on  # M_MMAP_THRESHOLD applied
    assert on["kept"] >= size, on  # M_TRIM_THRESHOLD applied: not trimmed when freed
    assert on["handed_back"] >= size, on  # malloc_trim(0) on leaving the outermost block
