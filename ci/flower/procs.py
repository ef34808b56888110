"""Processes the comparison starts, and what it measures of them.

A `Tracked` process has its output (stdout and stderr together) copied to
a log file line by line, each line offered to a callback; its CPU time is
read from /proc/PID/stat whenever the caller asks (`cpu_s`, e.g. when a
log line says a round began). A sampler thread reads its peak resident
set (VmHWM in /proc/PID/status) every `sample_s` while it runs; the last
reading, at most `sample_s` before it exits, is the peak. When it exits,
`os.wait4` gives the exact CPU time: user and system, every thread.

Not wait4's ru_maxrss: on Linux it is the larger of the process's own
peak and the pages of the process it was forked from, counted before its
exec; forked from this driver (numpy and the digits loaded, about 140 MB)
every process would read at least that.
"""

import os
import re
import signal
import subprocess
import threading
import time

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def proc_cpu_s(pid):
    """User + system CPU seconds of process `pid` so far (all its threads),
    or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2 (the command) is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def proc_status_kib(pid, key):
    """A `VmRSS`/`VmHWM`-style line of /proc/PID/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Tracked:
    """One child process, measured."""

    def __init__(self, argv, log_path, on_line=None, env=None, cwd=None, sample_s=0.05,
                 group=False):
        self.argv = argv
        self.started = time.monotonic()
        self._log = open(log_path, "w")
        self._on_line = on_line
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True, bufsize=1,
            start_new_session=group,
        )
        # With `group`, stop() signals the whole process group: what the
        # process started (Flower's SuperExec and app processes) goes too.
        self.group = group
        self.pid = self.proc.pid
        self.rusage = None
        self.status = None
        self.ended = None
        self.hwm_kib = 0
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._wait, daemon=True).start()
        threading.Thread(target=self._sample, args=(sample_s,), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if self._on_line is not None:
                self._on_line(self, ANSI.sub("", line.rstrip("\n")))
        self._log.close()

    def _wait(self):
        _, status, rusage = os.wait4(self.pid, 0)
        self.ended = time.monotonic()
        self.status = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.status  # reaped here, not by Popen
        self.rusage = rusage
        self._done.set()

    def _sample(self, every_s):
        while not self._done.wait(every_s):
            hwm = proc_status_kib(self.pid, "VmHWM")
            if hwm is not None:
                self.hwm_kib = max(self.hwm_kib, hwm)

    def cpu_s(self):
        return proc_cpu_s(self.pid)

    def rss_kib(self):
        return proc_status_kib(self.pid, "VmRSS")

    def running(self):
        return not self._done.is_set()

    def wait(self, timeout_s):
        """True when it exited within `timeout_s`; then its output is read."""
        if not self._done.wait(timeout_s):
            return False
        self._reader.join(5)
        return True

    def stop(self):
        """SIGTERM, then SIGKILL after 3 s (the process, or its group)."""
        for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
            if not self.running() and not self.group:
                return
            try:
                if self.group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if self._done.wait(grace_s) and self.group and sig == signal.SIGTERM:
                time.sleep(0.5)  # let the group's other members go before SIGKILL

    def totals(self):
        """CPU from wait4 and the last peak RSS read, once it exited."""
        r = self.rusage
        return {
            "exit_code": self.status,
            "wall_s": round(self.ended - self.started, 3),
            "cpu_user_s": round(r.ru_utime, 3),
            "cpu_sys_s": round(r.ru_stime, 3),
            "cpu_total_s": round(r.ru_utime + r.ru_stime, 3),
            "peak_rss_mib": round(self.hwm_kib / 1024, 1),
        }


class Fleet:
    """Every process a run started, stopped together."""

    def __init__(self):
        self.procs = []

    def start(self, *args, **kw):
        p = Tracked(*args, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            p.stop()

    def wait_all(self, procs, deadline):
        """Waits for every one of `procs` until the monotonic `deadline`;
        True when all exited."""
        for p in procs:
            if not p.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True


def proc_table():
    """pid -> (ppid, CPU seconds, RSS KiB) for every process now. CPU is
    user + system of the process and of its children it has reaped (so a
    finished child's time moves to its parent and is not lost); a zombie
    still shows its own."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        rss_kib = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        table[int(name)] = (int(fields[1]), ticks / TICKS_PER_S, rss_kib)
    return table


def tree_totals(table, root):
    """(CPU seconds, RSS KiB) of `root` and every descendant in `table`."""
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    cpu = rss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            cpu += table[pid][1]
            rss += table[pid][2]
            todo.extend(children.get(pid, []))
    return cpu, rss


class TreeSampler:
    """Every `every_s`, the CPU and summed RSS of each root's process tree,
    with the wall-clock time; `series[root]` is a list of (t, cpu, rss)."""

    def __init__(self, roots, every_s=0.1):
        self.roots = list(roots)
        self.series = {r: [] for r in self.roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def sample(self):
        t = time.time()
        table = proc_table()
        for r in self.roots:
            cpu, rss = tree_totals(table, r)
            if r in table:
                self.series[r].append((t, cpu, rss))

    def _run(self, every_s):
        while not self._stop.wait(every_s):
            self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def cpu_at(self, root, t):
        """The tree's CPU at wall-clock time `t`, from the nearest samples."""
        s = self.series[root]
        before = [x for x in s if x[0] <= t]
        after = [x for x in s if x[0] >= t]
        if not before or not after:
            return None
        (t0, c0, _), (t1, c1, _) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
