"""Where a process's peak RSS comes from: live memory, or freed memory glibc's heap still holds.

Runs a Python script in this process (as `python SCRIPT ARGS...` would) while a thread samples, every few
milliseconds, the resident set and glibc's `mallinfo2`: the bytes malloc has handed out and not had back
(live: heap blocks in use plus its own mmapped blocks) and the free bytes inside its heaps. RSS above live
is the interpreter, the libraries' code and data, and freed heap blocks glibc keeps for reuse (it returns
only the top of a heap). The running peaks go to OUT as one JSON object, rewritten at each new peak, so a
script that leaves with `os._exit` still leaves them:

    {"peak_rss_mib", "peak_live_mib", "at_rss_peak": {"live_mib", "heap_free_mib", "seconds"}}

    PYTHONPATH=. python tools/heap_trace.py OUT.json launch/train.py --config RUN.yaml

glibc only (Linux). Sampling walks malloc's free lists under its locks: the traced run gets a little slower,
so take speed from runs without it.
"""

import ctypes
import json
import os
import runpy
import sys
import threading
import time

INTERVAL_S = 0.003


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def sample_forever(out_path: str, start: float) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    peaks = {"peak_rss_mib": 0.0, "peak_live_mib": 0.0, "at_rss_peak": {}}
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page / 2**20
        info = libc.mallinfo2()
        live = (info.uordblks + info.hblkhd) / 2**20
        changed = live > peaks["peak_live_mib"] or rss > peaks["peak_rss_mib"]
        peaks["peak_live_mib"] = max(peaks["peak_live_mib"], live)
        if rss > peaks["peak_rss_mib"]:
            peaks["peak_rss_mib"] = rss
            peaks["at_rss_peak"] = {"live_mib": live, "heap_free_mib": info.fordblks / 2**20,
                                    "seconds": time.monotonic() - start}
        if changed:
            with open(out_path + ".tmp", "w") as f:
                json.dump(peaks, f)
            os.replace(out_path + ".tmp", out_path)
        time.sleep(INTERVAL_S)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python tools/heap_trace.py OUT.json SCRIPT [ARGS...]")
    out_path, script = sys.argv[1], sys.argv[2]
    threading.Thread(target=sample_forever, args=(out_path, time.monotonic()), daemon=True).start()
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` puts it first
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
