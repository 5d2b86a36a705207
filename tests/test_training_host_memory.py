"""perceiver.training.host_memory: freed blocks stay mapped, so reusing them costs no page faults."""

import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent('''
    import ctypes, resource, sys
    from perceiver.training import host_memory
    if sys.argv[1] == 'retain':
      assert host_memory.retain_freed_memory() is True
      assert host_memory.retain_freed_memory() is True   # idempotent
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def touch():   # a 256 MB block, written through, then freed (as XLA's temporaries)
      block = libc.malloc(256 * 2 ** 20)
      ctypes.memset(block, 1, 256 * 2 ** 20)
      libc.free(block)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _faults(mode):
  done = subprocess.run([sys.executable, '-c', _SCRIPT, mode], cwd=ROOT, check=True,
                        capture_output=True, text=True)
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or not platform.libc_ver()[0] == 'glibc',
                    reason='glibc only')
@pytest.mark.slow
def test_a_freed_block_is_reused_without_page_faults():
  pages = 256 * 2 ** 20 // 4096
  assert _faults('default') > pages // 2     # glibc unmaps it; touching it faults again
  assert _faults('retain') < pages // 100    # kept mapped
