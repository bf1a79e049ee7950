"""Energy meters with fake NVML devices, a fake powercap tree, and the aggregation."""

from collections import namedtuple

import pytest

from pbkd_mpi.output import energy
from pbkd_mpi.output.energy import (CPU_RAPL, GPU_COUNTER, GPU_NONE, GPU_SAMPLES, NOT_MEASURED,
                                    NvmlGpu, PhaseMeter, PowerIntegrator, RaplPackages, aggregate)


# --- fakes -----------------------------------------------------------------------------

class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The part of pynvml the meter uses. energy_mj None: the GPU has no energy counter."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_mj=None, power_mw=None, init_error=None):
        self.energy_mj = energy_mj
        self.power_mw = power_mw
        self.init_error = init_error
        self.opened = []
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        self.opened.append(("index", index))
        return f"handle{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.opened.append(("uuid", uuid))
        return f"handle-{uuid}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_mj is None:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        if self.power_mw is None:
            raise FakeNVMLError("Not Supported")
        return self.power_mw


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


CpuTimes = namedtuple("CpuTimes", "user system")
MemInfo = namedtuple("MemInfo", "rss vms")


class FakeProcess:
    def __init__(self):
        self.cpu = 0.0
        self.rss = 100 * 2**20

    def cpu_times(self):
        return CpuTimes(self.cpu * 0.75, self.cpu * 0.25)

    def memory_info(self):
        return MemInfo(self.rss, 2 * self.rss)


def make_powercap(root, packages):
    """packages: [(energy_uj, max_energy_range_uj)] as intel-rapl:N, each with a sub-zone
    (core) that must not be counted, and an unrelated zone."""
    for i, (value, maximum) in enumerate(packages):
        zone = root / f"intel-rapl:{i}"
        zone.mkdir(parents=True)
        (zone / "energy_uj").write_text(f"{value}\n")
        (zone / "max_energy_range_uj").write_text(f"{maximum}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "energy_uj").write_text("999999999\n")
        (sub / "max_energy_range_uj").write_text(f"{maximum}\n")
    (root / "dtpm").mkdir(exist_ok=True)
    return root


def set_energy(root, package, value):
    (root / f"intel-rapl:{package}" / "energy_uj").write_text(f"{value}\n")


# --- NVML ------------------------------------------------------------------------------

def test_nvml_counter_is_read_in_joules():
    nvml = FakeNvml(energy_mj=5_000)
    gpu = NvmlGpu("1", nvml=nvml, poll=False)
    assert gpu.method == GPU_COUNTER and nvml.opened == [("index", 1)]
    start = gpu.read()
    nvml.energy_mj += 2_500
    assert gpu.read() - start == pytest.approx(2.5)
    gpu.close()
    assert nvml.shutdowns == 1


def test_nvml_opens_uuid_devices_by_uuid():
    nvml = FakeNvml(energy_mj=0)
    NvmlGpu("GPU-1234", nvml=nvml, poll=False)
    assert nvml.opened == [("uuid", "GPU-1234")]


def test_nvml_without_counter_integrates_power_samples():
    nvml = FakeNvml(power_mw=200_000)  # 200 W
    clock = FakeClock()
    gpu = NvmlGpu("0", nvml=nvml, clock=clock, poll=False)
    assert gpu.method == GPU_SAMPLES
    start = gpu.read()
    clock.now += 2.0
    nvml.power_mw = 300_000  # ramps to 300 W: trapezoid gives 2 s * 250 W
    assert gpu.read() - start == pytest.approx(500.0)


def test_nvml_sampler_thread_samples_in_background():
    nvml = FakeNvml(power_mw=100_000)
    gpu = NvmlGpu("0", nvml=nvml, sample_interval_s=0.01)
    try:
        import time

        start = gpu.read()
        time.sleep(0.2)
        joules = gpu.read() - start
        assert 100 * 0.15 < joules < 100 * 1.0  # 100 W for about 0.2 s of monotonic time
    finally:
        gpu.close()


def test_nvml_missing_library_is_not_measured():
    gpu = NvmlGpu("0", nvml=FakeNvml(init_error=FakeNVMLError("NVML Shared Library Not Found")))
    assert gpu.method == NOT_MEASURED and gpu.read() is None
    assert gpu.describe() == ("not measured: NVML unavailable "
                              "(FakeNVMLError: NVML Shared Library Not Found)")


def test_nvml_gpu_without_energy_or_power_is_not_measured():
    nvml = FakeNvml()
    gpu = NvmlGpu("0", nvml=nvml, poll=False)
    assert gpu.method == NOT_MEASURED and "neither energy nor power" in gpu.reason
    assert nvml.shutdowns == 1


def test_real_pynvml_without_gpu_is_not_measured():
    # This machine has nvidia-ml-py but no driver: NVML's init fails.
    pytest.importorskip("pynvml")
    gpu = NvmlGpu("0", poll=False)
    try:
        if gpu.method != NOT_MEASURED:
            pytest.skip("a GPU with NVML is present")
        assert gpu.read() is None and gpu.describe().startswith("not measured: NVML unavailable")
    finally:
        gpu.close()


def test_power_integrator_trapezoid():
    clock = FakeClock()
    watts = iter([10.0, 20.0, 20.0, 0.0])
    integrator = PowerIntegrator(lambda: next(watts), clock)
    integrator.sample()  # 10 W at t=0
    clock.now += 1.0
    integrator.sample()  # 20 W at t=1: 15 J
    clock.now += 1.0
    assert integrator.joules() == pytest.approx(35.0)  # 20 W at t=2: +20 J
    clock.now += 0.5
    assert integrator.joules() == pytest.approx(40.0)  # 0 W at t=2.5: +5 J


# --- RAPL ------------------------------------------------------------------------------

def test_rapl_sums_packages_not_subzones(tmp_path):
    root = make_powercap(tmp_path / "powercap", [(1_000_000, 10**9), (5_000_000, 10**9)])
    rapl = RaplPackages(root, poll=False)
    assert rapl.method == CPU_RAPL
    assert rapl.read() == 0.0
    set_energy(root, 0, 3_000_000)  # +2 J
    set_energy(root, 1, 6_500_000)  # +1.5 J
    assert rapl.read() == pytest.approx(3.5)


def test_rapl_unwraps_at_max_energy_range(tmp_path):
    maximum = 262_143_328_850
    root = make_powercap(tmp_path / "powercap", [(maximum - 1_000_000, maximum)])
    rapl = RaplPackages(root, poll=False)
    set_energy(root, 0, 4_000_000)  # wrapped: 1 J to the top, 4 J after
    assert rapl.read() == pytest.approx(5.0)
    set_energy(root, 0, 6_000_000)
    assert rapl.read() == pytest.approx(7.0)


def test_rapl_poller_catches_every_wrap(tmp_path):
    # Two wraps within one phase are only seen if something reads in between.
    maximum = 10_000_000
    root = make_powercap(tmp_path / "powercap", [(0, maximum)])
    rapl = RaplPackages(root, poll=False)
    start = rapl.read()
    for value in (6_000_000, 2_000_000, 8_000_000, 1_000_000):  # poller readings
        set_energy(root, 0, value)
        rapl.read()
    assert rapl.read() - start == pytest.approx(21.0)


def test_rapl_missing_tree_is_not_measured(tmp_path):
    rapl = RaplPackages(tmp_path / "nothing", poll=False)
    assert rapl.method == NOT_MEASURED and rapl.read() is None
    assert rapl.describe().startswith("not measured: no RAPL counters")


def test_rapl_tree_without_packages_is_not_measured(tmp_path):
    (tmp_path / "dtpm").mkdir()
    rapl = RaplPackages(tmp_path, poll=False)
    assert rapl.method == NOT_MEASURED and "no RAPL package zones" in rapl.reason


def test_rapl_unreadable_counter_is_not_measured(tmp_path, monkeypatch):
    root = make_powercap(tmp_path / "powercap", [(0, 10**9)])

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(RaplPackages, "_raw", staticmethod(denied))
    rapl = RaplPackages(root, poll=False)
    assert rapl.method == NOT_MEASURED and "not readable by this user" in rapl.reason


# --- PhaseMeter ------------------------------------------------------------------------

def make_meter(tmp_path, **kwargs):
    clock, process = FakeClock(), FakeProcess()
    meter = PhaseMeter(clock=clock, process=process, poll=False,
                       powercap_root=kwargs.pop("powercap_root", tmp_path / "none"), **kwargs)
    return meter, clock, process


def test_phase_meter_measures_phases_and_tasks(tmp_path):
    root = make_powercap(tmp_path / "powercap", [(0, 10**12)])
    nvml = FakeNvml(energy_mj=0)
    meter, clock, process = make_meter(tmp_path, rank=1, node="n1", gpu="0", read_rapl=True,
                                       nvml=nvml, powercap_root=root)
    with meter.phase("distill"):
        for block, seconds in (("b1", 2.0), ("b2", 3.0)):
            with meter.task(block):
                clock.now += seconds
                process.cpu += seconds * 0.9
                nvml.energy_mj += seconds * 100_000  # 100 W
                set_energy(root, 0, int(clock.now - 100) * 50_000_000)  # 50 W package
    record = meter.snapshot()
    meter.close()
    distill = record["phases"]["distill"]
    assert distill["wall_s"] == pytest.approx(5.0) and distill["cpu_s"] == pytest.approx(4.5)
    assert distill["gpu_j"] == pytest.approx(500.0) and distill["cpu_j"] == pytest.approx(250.0)
    assert distill["count"] == 1 and distill["peak_rss_mb"] >= 100
    assert record["tasks"]["b2"]["gpu_j"] == pytest.approx(300.0)
    assert record["tasks"]["b1"]["wall_s"] == pytest.approx(2.0)
    assert (record["gpu_method"], record["cpu_method"]) == (GPU_COUNTER, CPU_RAPL)


def test_phase_meter_repeated_phase_adds_up(tmp_path):
    meter, clock, process = make_meter(tmp_path, rank=0, node="n")
    for _ in range(2):
        with meter.phase("cache"):
            clock.now += 1.5
            process.cpu += 1.0
    cache = meter.snapshot()["phases"]["cache"]
    assert (cache["wall_s"], cache["cpu_s"], cache["count"]) == (3.0, 2.0, 2)


def test_phase_meter_records_phase_that_raised(tmp_path):
    meter, clock, _ = make_meter(tmp_path, rank=0, node="n")
    with pytest.raises(ValueError):
        with meter.phase("teacher"):
            clock.now += 1.0
            raise ValueError("boom")
    assert meter.snapshot()["phases"]["teacher"]["wall_s"] == 1.0


def test_phase_meter_without_counters_says_not_measured(tmp_path):
    meter, clock, process = make_meter(
        tmp_path, rank=2, node="n", gpu="0", read_rapl=True,
        nvml=FakeNvml(init_error=FakeNVMLError("no driver")))
    with meter.phase("distill"):
        clock.now += 4.0
        process.cpu += 3.0
    record = meter.snapshot()
    assert record["phases"]["distill"]["gpu_j"] is None
    assert record["phases"]["distill"]["cpu_j"] is None
    assert record["phases"]["distill"]["cpu_s"] == 3.0
    assert record["gpu_method"].startswith("not measured: NVML unavailable")
    assert record["cpu_method"].startswith("not measured: no RAPL counters")


def test_phase_meter_counter_failing_midway_gives_none(tmp_path):
    nvml = FakeNvml(energy_mj=0)
    meter, clock, _ = make_meter(tmp_path, rank=1, node="n", gpu="0", nvml=nvml)
    with meter.phase("distill"):
        nvml.energy_mj = None  # the GPU fell off the bus
    assert meter.snapshot()["phases"]["distill"]["gpu_j"] is None


def test_snapshot_is_plain_data(tmp_path):
    import json
    import pickle

    meter, clock, _ = make_meter(tmp_path, rank=0, node="n")
    with meter.phase("p"):
        clock.now += 1
    record = meter.snapshot()
    assert json.loads(json.dumps(record)) == record
    assert pickle.loads(pickle.dumps(record)) == record


# --- aggregation -----------------------------------------------------------------------

def record(rank, node, phases, gpu_device=None, gpu_method=GPU_NONE, rapl_reader=False,
           cpu_method=energy.CPU_OTHER_RANK, peak=100.0):
    full = {}
    for name, (wall, cpu_s, gpu_j, cpu_j) in phases.items():
        full[name] = {"wall_s": wall, "cpu_s": cpu_s, "gpu_j": gpu_j, "cpu_j": cpu_j,
                      "peak_rss_mb": peak, "count": 1}
    return {"rank": rank, "node": node, "gpu_device": gpu_device, "gpu_method": gpu_method,
            "cpu_method": cpu_method, "rapl_reader": rapl_reader, "peak_rss_mb": peak,
            "phases": full, "tasks": {}}


def test_aggregate_two_nodes_counts_rapl_once_per_node():
    records = [
        record(0, "a", {"teacher": (10, 9, 1000, 400), "distill": (20, 1, 50, 300)},
               gpu_device="0", gpu_method=GPU_COUNTER, rapl_reader=True, cpu_method=CPU_RAPL),
        record(1, "a", {"distill": (19, 18, 2000, None)}, gpu_device="1",
               gpu_method=GPU_COUNTER),
        record(2, "b", {"distill": (18, 17, 1500, 250)}, gpu_device="0",
               gpu_method=GPU_COUNTER, rapl_reader=True, cpu_method=CPU_RAPL),
        record(3, "b", {"distill": (18, 16, 1600, None)}, gpu_device="1",
               gpu_method=GPU_COUNTER),
    ]
    result = aggregate(records[::-1])  # arrival order does not matter
    distill = result["per_phase"]["distill"]
    assert distill["ranks"] == [0, 1, 2, 3]
    assert distill["wall_s"] == 20 and distill["cpu_s"] == 52
    assert distill["gpu_j"] == 50 + 2000 + 1500 + 1600  # GPU 0 of node a and of node b differ
    assert distill["cpu_j"] == 300 + 250  # one reading per node
    assert result["per_phase"]["teacher"]["cpu_j"] == 400
    assert result["gpu_j"] == 1000 + 5150 and result["cpu_j"] == 400 + 550
    assert result["cpu_s"] == 9 + 52
    assert result["method"] == f"gpu: {GPU_COUNTER}; cpu: {CPU_RAPL}"
    assert result["notes"] == []
    assert [r["rank"] for r in result["per_rank"]] == [0, 1, 2, 3]
    assert result["per_rank"][0]["gpu_j"] == 1050 and result["per_rank"][0]["cpu_j"] == 700
    assert result["per_rank"][1]["cpu_j"] is None


def test_aggregate_duplicate_rapl_readers_on_a_node_count_once():
    records = [
        record(0, "a", {"distill": (5, 1, None, 100)}, rapl_reader=True, cpu_method=CPU_RAPL),
        record(1, "a", {"distill": (5, 4, None, 101)}, rapl_reader=True, cpu_method=CPU_RAPL),
    ]
    assert aggregate(records)["per_phase"]["distill"]["cpu_j"] == 100


def test_aggregate_shared_gpu_counted_once_with_a_note():
    records = [
        record(1, "a", {"distill": (5, 4, 700, None)}, gpu_device="0", gpu_method=GPU_COUNTER),
        record(3, "a", {"distill": (5, 4, 710, None)}, gpu_device="0", gpu_method=GPU_COUNTER),
    ]
    result = aggregate(records)
    assert result["gpu_j"] == 700
    assert result["notes"] == ["GPU 0 on a is used by ranks [1, 3]: its energy is counted "
                               "once per phase, from rank 1."]


def test_aggregate_nothing_measured_says_so_and_gives_cpu_seconds():
    records = [
        record(0, "vm", {"teacher": (30, 55, None, None)}, rapl_reader=True,
               cpu_method="not measured: no RAPL counters (/sys/class/powercap does not exist)"),
        record(1, "vm", {"distill": (20, 19, None, None)}),
        record(2, "vm", {"distill": (21, 20, None, None)}),
    ]
    result = aggregate(records)
    assert result["method"] == NOT_MEASURED
    assert result["gpu_j"] is None and result["cpu_j"] is None
    assert result["cpu_s"] == 94
    assert result["gpu_method"] == GPU_NONE
    assert result["cpu_method"].startswith("not measured: no RAPL counters")
    assert result["per_phase"]["distill"]["cpu_s"] == 39


def test_aggregate_partial_measurement_is_noted():
    records = [
        record(0, "a", {"distill": (5, 1, None, 100)}, rapl_reader=True, cpu_method=CPU_RAPL),
        record(1, "b", {"distill": (5, 4, None, None)}, rapl_reader=True,
               cpu_method="not measured: permission"),
        record(2, "b", {"distill": (5, 4, 300, None)}, gpu_device="0", gpu_method=GPU_SAMPLES),
        record(3, "b", {"distill": (5, 4, None, None)}, gpu_device="1",
               gpu_method="not measured: NVML unavailable"),
    ]
    result = aggregate(records)
    assert result["cpu_j"] == 100 and result["gpu_j"] == 300
    assert result["cpu_method"] == f"{CPU_RAPL}; not measured: permission"
    assert any("measured on 1 of 2 nodes (a)" in note for note in result["notes"])
    assert any("not measured on ranks [3]" in note for note in result["notes"])


def test_aggregate_round_trip_from_real_meters(tmp_path):
    nvml = FakeNvml(energy_mj=0)
    meters = [make_meter(tmp_path, rank=r, node="n", gpu=str(r), nvml=nvml)
              for r in range(2)]
    for meter, clock, process in meters:
        with meter.phase("distill"):
            clock.now += 2
            process.cpu += 1.5
    nvml.energy_mj = 0  # readings are differences, so the shared fake counter is harmless
    result = aggregate([meter.snapshot() for meter, _, _ in meters])
    assert result["per_phase"]["distill"]["cpu_s"] == 3.0
    assert result["gpu_method"] == GPU_COUNTER
    assert result["method"] == f"gpu: {GPU_COUNTER}; cpu: not measured: no rank read RAPL"


def test_aggregate_of_no_records_is_not_measured():
    result = aggregate([])
    assert result["method"] == NOT_MEASURED and result["per_phase"] == {}
    assert (result["gpu_j"], result["cpu_j"], result["cpu_s"]) == (None, None, 0)


def test_each_phase_measures_its_own_peak_memory():
    """A phase after a big allocation is freed reports its own peak, not the process's
    high-water mark; an enclosing measurement still sees the inner peak."""
    import sys

    import numpy as np

    from pbkd_mpi.output.memory import PeakMemory

    if not sys.platform.startswith("linux"):
        pytest.skip("resetting the high-water mark needs /proc/self/clear_refs")
    memory = PeakMemory()
    outer = memory.start()
    big = memory.start()
    block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    del block
    big_peak = memory.stop(big)
    small = memory.start()
    small_peak = memory.stop(small)
    outer_peak = memory.stop(outer)
    assert big_peak - small_peak > 350 * 2**20
    assert outer_peak >= big_peak and memory.peak() >= big_peak
