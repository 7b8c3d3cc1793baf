"""bench/launches.py's counting, bench/roofline.py's arithmetic and calibration, and bench/model.py end to end, on
the CPU (nothing here asserts a speed: the counts are checked by hand where they can be)."""
import json
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")
from bench import launches, model, roofline  # noqa: E402
from kernels import get_backend  # noqa: E402


def counted(fn, *shapes, mask_fraction=None):
    """Launches of fn(*fake tensors of the given shapes)."""
    fake = FakeTensorMode()
    counter = launches.LaunchCounter(mask_fraction)
    with fake:
        args = [torch.empty(s) for s in shapes]
        with counter:
            fn(*args)
    return counter.launches


def test_multi_tensor_kernels_as_multi_tensor_apply_launches_them():
    big = torch.empty(65536 * 320, device="meta")
    assert launches.multi_tensor_kernels([[big]]) == 1
    assert launches.multi_tensor_kernels([[torch.empty(65536 * 320 + 1, device="meta")]]) == 2
    small = [torch.empty(10, device="meta")] * 111
    assert launches.multi_tensor_kernels([small]) == 2          # 110 tensors per launch with one list
    assert launches.multi_tensor_kernels([small[:37]] * 4) == 2  # 36 with four


def test_aten_launches_bytes_and_flops_by_hand():
    def step(x, w, a, b):
        x.view(-1).t()                  # views: nothing
        torch.empty(5)                  # allocation: nothing
        y = x + w                       # w (64,) broadcast over x (8, 64): read once
        y.add_(1.0)                     # in place: read and written
        torch.empty(8, 64).copy_(y)     # copy_ reads only its source
        a @ b                           # 2 m n k
        y.sum().item()                  # a host sync
    ls = counted(step, (8, 64), (64,), (16, 32), (32, 8))
    names = [l.name for l in ls]
    assert names == ["aten.add.Tensor", "aten.add_.Tensor", "aten.copy_.default", "aten.mm.default",
                     "aten.sum.default", "aten._local_scalar_dense.default"]
    add, add_, copy, mm, _, sync = ls
    assert (add.read, add.written) == ((8 * 64 + 64) * 4, 8 * 64 * 4)
    assert (add_.read, add_.written) == (8 * 64 * 4, 8 * 64 * 4)
    assert (copy.read, copy.written) == (8 * 64 * 4, 8 * 64 * 4)
    assert mm.flops == 2 * 16 * 32 * 8 and mm.kernels == 1
    assert (sync.kernels, sync.syncs) == (0, 1)


def test_boolean_mask_index_costs_a_nonzero_and_a_sync():
    ls = counted(lambda x, m: x[m > 0], (40, 8), (40,), mask_fraction=0.25)
    nonzero, index = [l for l in ls if l.name in ("aten.nonzero.default", "aten.index.Tensor")]
    assert nonzero.syncs == 1 and index.written == 10 * 8 * 4
    with pytest.raises(NotImplementedError, match="boolean mask"):
        counted(lambda x, m: x[m > 0], (40, 8), (40,))


@pytest.fixture(scope="module")
def small_steps():
    get_backend("triton")
    return {v: launches.count_step("small", v, sms=82) for v in ("triton", "minimind2")}


def test_triton_step_counts(small_steps):
    step = small_steps["triton"]
    triton = [l for l in step.launches if l.kind == "triton"]
    assert triton and all(l.traffic == "formula" and l.grid for l in triton)
    # matmul FLOPs (the projections and the loss head, forward and backward) = 6 x weights x tokens
    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM
    from train import engine
    with torch.device("meta"):
        n_matmul = engine.matmul_params(MiniMindForCausalLM(MiniMindConfig.from_preset("small")))
    matmul = sum(l.flops for l in step.launches if l.op in ("matmul", "linear_cross_entropy"))
    assert matmul == 6 * n_matmul * 32 * 512
    phases = step.by("phase")
    assert set(phases) == {"forward", "backward", "optimizer"} and phases["optimizer"]["flops"] == 0
    assert step.by("op")["rope"]["launches"] == 16  # one kernel per layer, forward and backward


def test_minimind2_step_pads_and_moves_more(small_steps):
    ours, ref = small_steps["triton"], small_steps["minimind2"]
    assert ref.useful_tokens < ours.useful_tokens == 32 * 512
    assert ref.totals()["bytes"] > 2 * ours.totals()["bytes"]
    assert ref.totals()["launches"] > ours.totals()["launches"]
    assert ref.by("op")["rms_norm"]["launches"] > 1  # the reference's norm is several kernels, ours is one each way


def test_roofline_by_hand():
    g = roofline.GPU("test", 10, tflops=100.0, gbps=1000.0, peak_tflops=200.0, launch_us=5.0, sync_us=50.0)
    mem = launches.Launch("a", "aten", "forward", "x", read=6_000_000, written=4_000_000)        # 10 us of memory
    comp = launches.Launch("b", "aten", "forward", "y", flops=4_000_000_000, exec_flops=2_000_000_000)  # 20 us
    sync = launches.Launch("c", "sync", "forward", "x", kernels=0, syncs=1)
    step = launches.StepCount("small", "triton", 10, 1, 100, useful_tokens=100, flops_per_token=1e6,
                              launches=[mem, comp, sync])
    p = roofline.project(step, g)
    assert p["step_ms"] == pytest.approx((10 + 20 + 2 * 5 + 50) * 1e-3)
    assert p["share_memory"] == pytest.approx(10 / 90) and p["share_compute"] == pytest.approx(20 / 90)
    assert p["useful_tokens_per_s"] == pytest.approx(100 / 90e-6)
    assert p["mfu"] == pytest.approx(100 * 1e6 / 90e-6 / 200e12)
    assert p["per_op_ms"] == pytest.approx({"x": (10 + 5 + 50) * 1e-3, "y": (20 + 5) * 1e-3})
    assert p["label"] == "modelled, not measured"


def _write_run(folder, device, kind, step_ms, copy_gbps=800.0, matmul_tflops=60.0):
    folder.mkdir(parents=True)
    env = {"device": device, "device_kind": kind}
    (folder / "throughput.json").write_text(json.dumps({"kind": "throughput", "env": env, "results": [
        {"preset": "small", "variant": "triton", "seq_len": 512, "batch_size": 32, "status": "ok",
         "step_ms": step_ms}]}))
    (folder / "kernels.json").write_text(json.dumps({"kind": "kernels", "env": env, "ceilings": {
        "copy_GBps": copy_gbps, "matmul_TFLOPs": matmul_tflops}}))


def test_calibration_from_a_measured_run(tmp_path):
    """Rates from kernels.json, launch overhead fitted to the measured step; other GPUs and CPU runs ignored."""
    mem = launches.Launch("a", "aten", "forward", "x", kernels=100, read=8_000_000_000)  # 10 ms at 800 GB/s
    step = launches.StepCount("small", "triton", 82, 32, 512, 16384, 1e6, [mem])
    _write_run(tmp_path / "2026-12-01_rtx3090", "NVIDIA GeForce RTX 3090", "cuda", step_ms=10.0 + 100 * 7e-3)
    _write_run(tmp_path / "2026-12-02_h100", "NVIDIA H100 80GB HBM3", "cuda", step_ms=1.0)
    _write_run(tmp_path / "2026-12-03_cpu", "NVIDIA GeForce RTX 3090 (smoke)", "cpu", step_ms=1.0)
    steps = {("small", "triton", 512, 32): step}
    g, rows = roofline.calibrate(roofline.gpu("RTX 3090"), steps, str(tmp_path))
    assert (g.gbps, g.tflops, g.calibrated_from) == (800.0, 60.0, "2026-12-01_rtx3090")
    assert g.launch_us == pytest.approx(7.0)
    assert rows == [{"preset": "small", "variant": "triton", "seq_len": 512, "batch_size": 32,
                     "measured_step_ms": pytest.approx(10.7), "modelled_step_ms": pytest.approx(10.7)}]
    assert roofline.calibrate(roofline.gpu("A100 SXM 80GB"), steps, str(tmp_path)) == (roofline.gpu("A100 SXM 80GB"),
                                                                                        [])


def test_model_cli_writes_labelled_tables(tmp_path, small_steps, monkeypatch):
    """python -m bench.model for MiniMind2-Small on a 3090 (the counts reused), with a measured run to calibrate."""
    monkeypatch.setattr(launches, "count_step", lambda preset, variant, sms, **kw: small_steps[variant])
    _write_run(tmp_path / "results" / "2026-12-01_rtx3090", "NVIDIA GeForce RTX 3090", "cuda", step_ms=80.0)
    out = tmp_path / "model"
    assert model.main(["--preset", "small", "--variants", "minimind2", "triton", "--gpus", "RTX 3090",
                       "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    doc = json.loads((out / "model.json").read_text())
    assert doc["label"] == "modelled, not measured" and {r["variant"] for r in doc["steps"]} == {"minimind2", "triton"}
    ours = next(r for r in doc["projections"] if r["variant"] == "triton")
    assert ours["constants"]["calibrated_from"] == "2026-12-01_rtx3090"
    assert doc["calibration"]["RTX 3090"]["measured_vs_modelled"][0]["measured_step_ms"] == 80.0
    text = (out / "model.md").read_text()
    assert text.count("modelled, not measured") >= 4 and "MiniMind2-Small on an RTX 3090" in text
    assert "measured 80.0 ms" in text
    assert model.headline(doc).startswith("**MiniMind2-Small on an RTX 3090 (modelled, not measured):**")


def test_findings_offer_cuda_graphs_where_launches_dominate():
    row = {"preset": "small", "variant": "triton", "gpu": "H200 SXM", "launches": 600, "syncs": 0,
           "share_launch": 0.3, "launch_ms": 3.0, "step_ms": 10.0}
    lines = model.findings({"projections": [row]})
    assert "30% (H200 SXM)" in lines[0] and "--compile_mode reduce-overhead" in lines[-1]
    assert not any("reduce-overhead" in x for x in model.findings({"projections": [{**row, "share_launch": 0.1}]}))


def test_uncalibrated_gpus_use_the_datasheet():
    from bench.cost import DATASHEET
    for name, (key, sms) in roofline.GPUS.items():
        g = roofline.gpu(name)
        assert (g.tflops, g.gbps, g.sms) == (*DATASHEET[key], sms) and g.calibrated_from is None
    with pytest.raises(ValueError, match="unknown GPU"):
        roofline.gpu("RTX 2080")
