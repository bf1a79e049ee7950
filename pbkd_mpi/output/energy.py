"""Energy and resources per rank, per phase and per task, measured honestly.

Each rank keeps one `PhaseMeter`; rank 0 combines their snapshots with `aggregate`:

    from pbkd_mpi.output.energy import PhaseMeter, aggregate

    meter = PhaseMeter(rank=comm.Get_rank(), node=socket.gethostname(),
                       gpu=choice.device_id,          # devices.GpuChoice; None: no GPU used
                       read_rapl=(local_rank == 0))   # one RAPL reader per node
    with meter.phase("distill"):                      # phases of one rank must not overlap
        with meter.task("block_3"):                   # tasks nest in phases, any number
            ...
    record = meter.snapshot()    # a plain, picklable dict: send it to rank 0
    meter.close()                # stops background threads, releases NVML
    energy = aggregate(records)  # on rank 0, records of every rank: report["energy"]

What is measured:

- GPU energy from NVML: the total-energy counter (mJ since driver load, Volta and newer)
  when the GPU supports it, else power samples (every `sample_interval_s`, in a background
  thread) integrated over time. NVML's counters update every 20-100 ms, so phases and tasks
  shorter than that are not resolved.
- CPU package energy from RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`, packages
  only, so sub-zones are not counted twice), unwrapped at `max_energy_range_uj` and polled
  in the background so a long phase cannot miss a wrap. It is a whole-node figure: one rank
  per node reads it, and `aggregate` counts each node once.
- CPU seconds (user + system) of the rank's process, and its peak resident memory per phase
  and task (output/memory.py: each measures its own peak, not the process's mark so far).

Where a counter does not exist or cannot be read (no GPU, NVML missing, no powercap tree,
energy_uj readable only by root), the joules are None and the method says "not measured"
with the reason; CPU seconds are always given. Nothing here estimates energy: every joule
figure comes from a hardware counter or from measured power samples.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import threading
import time
from pathlib import Path

import psutil

from pbkd_mpi.output.memory import PeakMemory

NOT_MEASURED = "not measured"
GPU_COUNTER = "nvml energy counter"
GPU_SAMPLES = "nvml power samples, integrated"
GPU_NONE = "no GPU used"
CPU_RAPL = "rapl package counters"
CPU_OTHER_RANK = "read by another rank on this node"

DEFAULT_POWERCAP = "/sys/class/powercap"
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # intel-rapl:0, not the sub-zone intel-rapl:0:1


# ---------------------------------------------------------------------------------------
# Background polling


class _Poller:
    """Calls `action` every `interval_s` seconds in a daemon thread until stopped. The
    thread sleeps on an Event, so stopping is immediate and an idle rank stays idle."""

    def __init__(self, action, interval_s: float, name: str):
        self._action = action
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self._interval_s):
            try:
                self._action()
            except Exception:  # noqa: BLE001 - a failed sample must not kill the run
                pass

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------
# GPU: NVML


class PowerIntegrator:
    """Energy from power samples by the trapezoid rule. `sample()` takes one reading;
    `joules()` takes one more and returns the energy so far, so phase boundaries are exact
    to one reading. Thread-safe: the poller samples while phases read."""

    def __init__(self, read_watts, clock=time.monotonic):
        self._read_watts = read_watts
        self._clock = clock
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last = None  # (time, watts) of the previous sample

    def sample(self) -> None:
        # Read and timestamp under the lock, so concurrent samples stay in time order.
        with self._lock:
            watts = self._read_watts()
            now = self._clock()
            if self._last is not None:
                then, before = self._last
                self._joules += (now - then) * (before + watts) / 2.0
            self._last = (now, watts)

    def joules(self) -> float:
        self.sample()
        with self._lock:
            return self._joules


def _load_pynvml():
    return importlib.import_module("pynvml")


class NvmlGpu:
    """Cumulative energy of one GPU in joules via NVML, or `method` = "not measured".

    device_id: NVML's index ("0") or a "GPU-..."/"MIG-..." UUID (devices.GpuChoice.device_id).
    nvml: a pynvml-like module (tests pass a fake); default: import pynvml.
    """

    def __init__(self, device_id: str, nvml=None, sample_interval_s: float = 0.1,
                 clock=time.monotonic, poll: bool = True):
        self.device_id = str(device_id)
        self.method = NOT_MEASURED
        self.reason = ""
        self._nvml = None
        self._handle = None
        self._integrator = None
        self._poller = None
        try:
            nvml = _load_pynvml() if nvml is None else nvml
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no driver, no library: not measured
            self.reason = f"NVML unavailable ({type(exc).__name__}: {exc})"
            return
        self._nvml = nvml
        try:
            self._handle = self._open(nvml)
        except Exception as exc:  # noqa: BLE001
            self.reason = f"NVML cannot open GPU {self.device_id} ({exc})"
            self._shutdown()
            return
        self._choose_method(nvml, sample_interval_s, clock, poll)

    def _open(self, nvml):
        if self.device_id.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(self.device_id)
        return nvml.nvmlDeviceGetHandleByIndex(int(self.device_id))

    def _choose_method(self, nvml, sample_interval_s, clock, poll):
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.method = GPU_COUNTER
            return
        except Exception:  # noqa: BLE001 - not supported before Volta: sample power
            pass
        try:
            nvml.nvmlDeviceGetPowerUsage(self._handle)
        except Exception as exc:  # noqa: BLE001
            self.reason = f"GPU {self.device_id} reports neither energy nor power ({exc})"
            self._shutdown()
            return
        # nvmlDeviceGetPowerUsage is in milliwatts.
        self._integrator = PowerIntegrator(
            lambda: nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0, clock)
        self._integrator.sample()
        if poll:
            self._poller = _Poller(self._integrator.sample, sample_interval_s, "pbkd-nvml")
        self.method = GPU_SAMPLES

    def read(self) -> float | None:
        """Joules since an arbitrary origin (differences are what count); None if not
        measured."""
        if self.method == GPU_COUNTER:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0
        if self.method == GPU_SAMPLES:
            return self._integrator.joules()
        return None

    def describe(self) -> str:
        return f"{NOT_MEASURED}: {self.reason}" if self.method == NOT_MEASURED else self.method

    def _shutdown(self):
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def close(self):
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        self._shutdown()


# ---------------------------------------------------------------------------------------
# CPU packages: RAPL


class RaplPackages:
    """Cumulative package energy of this node in joules from the powercap tree, or
    `method` = "not measured". root is injectable so tests use a fake tree."""

    def __init__(self, root: str | os.PathLike = DEFAULT_POWERCAP, poll_s: float = 10.0,
                 poll: bool = True):
        self.root = Path(root)
        self.method = NOT_MEASURED
        self.reason = ""
        self._zones = []  # [(energy_uj path, max_energy_range_uj)]
        self._lock = threading.Lock()
        self._last = []
        self._total_uj = []
        self._poller = None
        try:
            self._zones = self._find_zones()
            self._last = [self._raw(path) for path, _ in self._zones]
        except (OSError, ValueError) as exc:
            self.reason = self._explain(exc)
            self._zones = []
            return
        if not self._zones:
            self.reason = f"no RAPL package zones (intel-rapl:N) under {self.root}"
            return
        self._total_uj = [0] * len(self._zones)
        self.method = CPU_RAPL
        if poll:
            # A 262 kJ range wraps after about 15 minutes at 300 W; poll well within that.
            self._poller = _Poller(self.read, poll_s, "pbkd-rapl")

    def _find_zones(self):
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} does not exist")
        zones = []
        for zone in sorted(self.root.iterdir()):
            if _PACKAGE_ZONE.match(zone.name):
                maximum = int((zone / "max_energy_range_uj").read_text().strip())
                zones.append((zone / "energy_uj", maximum))
        return zones

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text().strip())

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, PermissionError):
            return (f"{exc.filename} is not readable by this user (RAPL needs root or a "
                    "permission change by the administrator)")
        if isinstance(exc, FileNotFoundError):
            return f"no RAPL counters ({exc.filename or exc})"
        return f"RAPL counters unreadable ({exc})"

    def read(self) -> float | None:
        """Joules since this reader started, all packages summed; None if not measured."""
        if self.method != CPU_RAPL:
            return None
        with self._lock:
            for i, (path, maximum) in enumerate(self._zones):
                raw = self._raw(path)
                delta = raw - self._last[i]
                if delta < 0:  # the counter wrapped past max_energy_range_uj to 0
                    delta += maximum
                self._total_uj[i] += delta
                self._last[i] = raw
            return sum(self._total_uj) / 1e6

    def describe(self) -> str:
        return f"{NOT_MEASURED}: {self.reason}" if self.method == NOT_MEASURED else self.method

    def close(self):
        if self._poller is not None:
            self._poller.stop()
            self._poller = None


# ---------------------------------------------------------------------------------------
# The process: CPU seconds and memory


class ProcessUsage:
    """CPU seconds (user + system, all threads) of this process."""

    def __init__(self, process=None):
        if process is None:
            process = psutil.Process()
        self._process = process

    def cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)


# ---------------------------------------------------------------------------------------
# One rank's meter


class PhaseMeter:
    """Measures phases and tasks of one rank. See the module docstring for the API.

    rank, node: where the figures come from (node: a host name; ranks on one node share
        its RAPL counters and may share a GPU).
    gpu: NVML device id of the GPU this rank uses, or None when it uses none.
    read_rapl: True on exactly one rank per node.
    nvml, powercap_root, process, clock: injectable for tests.
    """

    def __init__(self, rank: int, node: str, gpu: str | None = None, read_rapl: bool = False,
                 *, nvml=None, powercap_root: str | os.PathLike = DEFAULT_POWERCAP,
                 process=None, clock=time.monotonic, sample_interval_s: float = 0.1,
                 poll: bool = True):
        self.rank = rank
        self.node = node
        self.gpu_device = None if gpu is None else str(gpu)
        self._clock = clock
        self._usage = ProcessUsage(process)
        self._memory = PeakMemory()
        self._gpu = (None if gpu is None else
                     NvmlGpu(gpu, nvml, sample_interval_s, clock=clock, poll=poll))
        self._rapl = RaplPackages(powercap_root, poll=poll) if read_rapl else None
        self._phases: dict[str, dict] = {}
        self._tasks: dict[str, dict] = {}
        self.memory_watch = None  # an output/memory.MemoryWatch, told each phase's name

    def _read(self) -> dict:
        return {
            "wall_s": self._clock(),
            "cpu_s": self._usage.cpu_seconds(),
            "gpu_j": _safe_read(self._gpu),
            "cpu_j": _safe_read(self._rapl),
        }

    @contextlib.contextmanager
    def _measure(self, into: dict, name: str):
        start, memory = self._read(), self._memory.start()
        try:
            yield
        finally:
            end = self._read()
            figures = {key: _difference(end[key], start[key]) for key in start}
            figures["peak_rss_mb"] = self._memory.stop(memory) / 2**20
            _accumulate(into, name, figures)

    def phase(self, name: str):
        """Context manager measuring a phase; a repeated name adds to the same entry."""
        if self.memory_watch is not None:
            self.memory_watch.phase = name
        return self._measure(self._phases, name)

    def task(self, name: str):
        """Context manager measuring one task (reported per task, not added to totals)."""
        return self._measure(self._tasks, name)

    def gpu_method(self) -> str:
        return GPU_NONE if self._gpu is None else self._gpu.describe()

    def cpu_method(self) -> str:
        return CPU_OTHER_RANK if self._rapl is None else self._rapl.describe()

    def snapshot(self) -> dict:
        """This rank's figures so far, as a plain dict (what `aggregate` takes)."""
        return {
            "rank": self.rank,
            "node": self.node,
            "gpu_device": self.gpu_device,
            "gpu_method": self.gpu_method(),
            "cpu_method": self.cpu_method(),
            "rapl_reader": self._rapl is not None,
            "peak_rss_mb": self._memory.peak() / 2**20,
            "phases": {name: dict(figures) for name, figures in self._phases.items()},
            "tasks": {name: dict(figures) for name, figures in self._tasks.items()},
        }

    def close(self):
        for source in (self._gpu, self._rapl, self.memory_watch):
            if source is not None:
                source.close()


def _safe_read(source) -> float | None:
    """A source's reading, or None: a counter that fails mid-run (a GPU lost, a driver
    reloaded) gives a missing figure, never a wrong one or a crashed run."""
    if source is None:
        return None
    try:
        return source.read()
    except Exception:  # noqa: BLE001
        return None


def _difference(end, start):
    if end is None or start is None:
        return None
    return end - start


def _accumulate(into: dict, name: str, figures: dict) -> None:
    if name not in into:
        into[name] = dict(figures, count=1)
        return
    entry = into[name]
    for key in ("wall_s", "cpu_s", "gpu_j", "cpu_j"):
        entry[key] = _add(entry[key], figures[key])
    entry["peak_rss_mb"] = max(entry["peak_rss_mb"], figures["peak_rss_mb"])
    entry["count"] += 1


def _add(a, b):
    """Sum where a missing figure stays missing: half a measurement is not a measurement."""
    if a is None or b is None:
        return None
    return a + b


# ---------------------------------------------------------------------------------------
# Rank 0: the report's energy section


def aggregate(records: list[dict]) -> dict:
    """Combine every rank's `PhaseMeter.snapshot()` into the report's energy section:

    {"gpu_j", "cpu_j", "cpu_s", "method", "gpu_method", "cpu_method", "notes",
     "per_rank": [...], "per_phase": {name: {...}}}

    Phases of one name are combined across ranks: wall_s is the longest, cpu_s the sum,
    gpu_j the sum over distinct GPUs (a GPU shared by several ranks is counted once, from
    the lowest rank), cpu_j the sum over nodes (each node's package energy once, from its
    RAPL reader). Totals are sums over phases. A joule figure is None when nothing measured
    it; when only some GPUs or nodes were measured, the sum covers those and `notes` says so.
    """
    records = sorted(records, key=lambda record: record["rank"])
    phase_names = []
    for record in records:
        phase_names += [name for name in record["phases"] if name not in phase_names]
    per_phase = {name: _phase_total(name, records) for name in phase_names}
    gpu_methods, cpu_methods = _methods(records)
    gpu_method = "; ".join(gpu_methods) if gpu_methods else GPU_NONE
    cpu_method = "; ".join(cpu_methods) if cpu_methods else f"{NOT_MEASURED}: no rank read RAPL"
    return {
        "gpu_j": _total(phase["gpu_j"] for phase in per_phase.values()),
        "cpu_j": _total(phase["cpu_j"] for phase in per_phase.values()),
        "cpu_s": sum(phase["cpu_s"] for phase in per_phase.values()),
        "method": _overall_method(gpu_methods + cpu_methods, gpu_method, cpu_method),
        "gpu_method": gpu_method,
        "cpu_method": cpu_method,
        "notes": _notes(records),
        "per_rank": [_rank_summary(record) for record in records],
        "per_phase": per_phase,
    }


def _phase_total(name: str, records: list[dict]) -> dict:
    entries = [(record, record["phases"][name]) for record in records if name in record["phases"]]
    gpus, nodes = {}, {}
    for record, figures in entries:
        if figures["gpu_j"] is not None and record["gpu_device"] is not None:
            gpus.setdefault((record["node"], record["gpu_device"]), figures["gpu_j"])
        if figures["cpu_j"] is not None and record["rapl_reader"]:
            nodes.setdefault(record["node"], figures["cpu_j"])
    return {
        "ranks": [record["rank"] for record, _ in entries],
        "wall_s": max(figures["wall_s"] for _, figures in entries),
        "cpu_s": sum(figures["cpu_s"] for _, figures in entries),
        "gpu_j": sum(gpus.values()) if gpus else None,
        "cpu_j": sum(nodes.values()) if nodes else None,
        "peak_rss_mb": max(figures["peak_rss_mb"] for _, figures in entries),
    }


def _total(values):
    values = [value for value in values if value is not None]
    return sum(values) if values else None


def _rank_summary(record: dict) -> dict:
    phases = record["phases"].values()
    return {
        "rank": record["rank"],
        "node": record["node"],
        "gpu_device": record["gpu_device"],
        "gpu_method": record["gpu_method"],
        "cpu_method": record["cpu_method"],
        "cpu_s": sum(figures["cpu_s"] for figures in phases),
        "gpu_j": _total(figures["gpu_j"] for figures in phases),
        "cpu_j": _total(figures["cpu_j"] for figures in phases),
        "peak_rss_mb": record["peak_rss_mb"],
        "phases": record["phases"],
        "tasks": record["tasks"],
    }


def _methods(records: list[dict]) -> tuple[list[str], list[str]]:
    """The distinct GPU and CPU methods, in rank order (ranks without a GPU, and ranks
    that leave RAPL to another rank on their node, add nothing)."""
    gpu, cpu = [], []
    for record in records:
        if record["gpu_method"] != GPU_NONE and record["gpu_method"] not in gpu:
            gpu.append(record["gpu_method"])
        if record["rapl_reader"] and record["cpu_method"] not in cpu:
            cpu.append(record["cpu_method"])
    return gpu, cpu


def _overall_method(methods: list[str], gpu_method: str, cpu_method: str) -> str:
    """One line: "not measured" when no counter measured anything (then CPU seconds are
    the only resource figure), else what measured the GPU and the CPU."""
    if not any(not method.startswith(NOT_MEASURED) for method in methods):
        return NOT_MEASURED
    return f"gpu: {gpu_method}; cpu: {cpu_method}"


def _notes(records: list[dict]) -> list[str]:
    notes = []
    users: dict[tuple, list[int]] = {}
    for record in records:
        if record["gpu_device"] is not None:
            users.setdefault((record["node"], record["gpu_device"]), []).append(record["rank"])
    for (node, device), ranks in users.items():
        if len(ranks) > 1:
            notes.append(f"GPU {device} on {node} is used by ranks {ranks}: its energy is "
                         f"counted once per phase, from rank {ranks[0]}.")
    nodes = sorted({record["node"] for record in records})
    read = sorted({record["node"] for record in records
                   if record["rapl_reader"] and record["cpu_method"] == CPU_RAPL})
    if read and read != nodes:
        notes.append(f"CPU package energy was measured on {len(read)} of {len(nodes)} nodes "
                     f"({', '.join(read)}); cpu_j covers only those.")
    gpu_ranks = [record for record in records if record["gpu_device"] is not None]
    unmeasured = [record["rank"] for record in gpu_ranks
                  if record["gpu_method"].startswith(NOT_MEASURED)]
    if unmeasured and len(unmeasured) < len(gpu_ranks):
        notes.append(f"GPU energy was not measured on ranks {unmeasured}; gpu_j covers the "
                     "other GPUs only.")
    return notes
