"""Mixed precision as CUDA runs it, checked on CPU (issue: correct on CUDA).

CPU autocast differs from CUDA's: CUDA runs acos, exp, softmax, cross-entropy... in fp32 and the
matmul in bf16/fp16; CPU keeps most ops in the low dtype. So these tests either emulate CUDA's rule
(``cuda_acos``: acos forced to fp32 under autocast) or check dtypes and values directly: every head's
logits are fp32 under autocast and equal the fp32 computation, ArcFace's gradient stays finite where
a target cosine is 1 in fp16, and the CPK probe's masses are fp32/fp64 and never exceed 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.config import HeadConfig
from hfsoftmax.heads import FullSoftmax, build_head
from hfsoftmax.heads.rp import RPSoftmax
from hfsoftmax.heads.margin import _sqrt_eps, margin_logits
from test_selective import head_on, local_store

B, K, D = 6, 12, 8


@pytest.fixture
def cuda_acos(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's autocast rule for acos: under autocast its result is fp32 whatever its input."""
    orig = torch.acos

    def acos(x: torch.Tensor) -> torch.Tensor:
        return orig(x.float()) if torch.is_autocast_enabled("cpu") else orig(x)

    monkeypatch.setattr(torch, "acos", acos)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, K, (B,), generator=g)


def _head(name: str, margin: str) -> torch.nn.Module:
    """A full or RP head with each margin (RP takes margins as a library class; the train loop trains
    it plain)."""
    m = (1.1, 0.2, 0.1) if margin == "combined" else 0.3
    torch.manual_seed(1)
    if name == "rp":
        return RPSoftmax(K, D, 4, margin=margin, scale=16.0, margin_m=m)
    return FullSoftmax(K, D, margin=margin, scale=16.0, margin_m=m)


@pytest.mark.parametrize("margin", ["none", "cosface", "arcface", "combined"])
@pytest.mark.parametrize("name", ["full", "rp"])
def test_head_logits_are_fp32_under_autocast(name: str, margin: str, cuda_acos: None) -> None:
    head = _head(name, margin)
    f, y = _data()
    x = head.project(f) if name == "rp" else f
    ref_logits = margin_logits(x, head.weight, y, margin, 16.0, head.rule.m)
    ref_loss = head(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = head.project(f) if name == "rp" else f
        logits = margin_logits(x, head.weight, y, margin, 16.0, head.rule.m)
        loss = head(f, y)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)


def test_combined_margin_under_cuda_autocast_rule(cuda_acos: None) -> None:
    """The scatter of the combined margin saw a bf16 cos and an fp32 acos result on CUDA."""
    head = _head("full", "combined")
    f, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(f.bfloat16(), y)             # the backbone's bf16 output
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_mach_logits_fp32_under_autocast() -> None:
    cfg = HeadConfig(name="mach")
    cfg.mach.num_hashes, cfg.mach.num_buckets = 2, 4
    torch.manual_seed(0)
    head = build_head(cfg, K, D)
    f, y = _data()
    ref = head(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.logits(f).dtype == torch.float32
        loss = head(f.bfloat16(), y)
    torch.testing.assert_close(loss, head(f.bfloat16().float(), y), rtol=0, atol=0)
    assert abs(float(loss.detach()) - float(ref.detach())) < 0.05


def test_arcface_fp16_target_cosine_one_has_finite_gradient() -> None:
    """A target cosine of exactly 1 in fp16: sqrt(1 - cos^2) clamped at 1e-12 (= 0 in fp16) gave an
    inf gradient; the head now computes in fp32, and the clamp is dtype-aware where fp16 remains."""
    f = torch.randn(B, D)
    w = torch.randn(K, D)
    y = torch.arange(B)
    w[:B] = f                                        # target rows parallel to the features: cos = 1
    for dtype in (torch.float16, torch.bfloat16):
        fx = f.to(dtype).requires_grad_()
        wx = w.to(dtype).requires_grad_()
        logits = margin_logits(fx, wx, y, "arcface", 64.0, 0.5)
        assert logits.dtype == torch.float32
        F.cross_entropy(logits, y).backward()
        assert torch.isfinite(fx.grad).all() and torch.isfinite(wx.grad).all()
    assert _sqrt_eps(torch.float16) > 0 and torch.tensor(_sqrt_eps(torch.float16), dtype=torch.float16) > 0
    assert _sqrt_eps(torch.float32) == 1e-12


def test_cpk_probe_is_fp32_under_autocast() -> None:
    """The probe's log-partition and masses equal the fp32 ones under bf16 autocast; mass <= 1."""
    K2, D2 = 300, 16
    store = local_store(K2, D2, init_std=0.5)
    head = head_on(store, 30, margin="cosface", cpk_every=1)
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.standard_normal((8, D2)).astype(np.float32))
    head.begin_step(0, 0.0)
    lse, probs = head.exact_mass(feats, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lse_a, probs_a = head.exact_mass(feats, 30)
    assert lse_a.dtype == torch.float64
    torch.testing.assert_close(lse_a, lse, rtol=0, atol=1e-9)
    torch.testing.assert_close(probs_a, probs, rtol=0, atol=1e-9)
    labels = torch.from_numpy(rng.integers(0, K2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(feats.bfloat16(), labels)
    st = head.stats()
    assert 0 < st["cpk_active"] <= 1.0 + 1e-9 and 0 < st["cpk_exact"] <= 1.0 + 1e-9


# --------------------------------------------------------------------------------------------- #
# The train loop: the scaler's skip, its state, RNG states, device layouts, config words.

import os  # noqa: E402


from hfsoftmax import dist as hdist  # noqa: E402
from hfsoftmax.config import ConfigError, load_config  # noqa: E402
from hfsoftmax.heads.selective import SelectiveSoftmax  # noqa: E402
from hfsoftmax.train import Precision, backend_flags, rng_state, set_rng_state, train  # noqa: E402
from paramserver.store import WeightStore  # noqa: E402


def _tiny_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_precision_step_reports_the_scalers_skip() -> None:
    prec = Precision("fp16", torch.device("cpu"))
    model, opt = _tiny_model()
    scale0 = float(prec.grad_scale())
    assert scale0 == 65536.0                         # known before the first backward (the head needs it)
    prec.backward(model(torch.ones(1, 4)).sum())
    w = model.weight.detach().clone()
    assert prec.step(opt) is True and not torch.equal(model.weight, w)
    opt.zero_grad()
    prec.backward(model(torch.ones(1, 4)).sum())
    model.weight.grad[0, 0] = float("inf")           # an fp16 overflow somewhere in the backbone
    w = model.weight.detach().clone()
    assert prec.step(opt) is False and torch.equal(model.weight, w)
    assert float(prec.grad_scale()) == scale0 / 2    # the scaler backed off
    state = prec.state_dict()
    other = Precision("fp16", torch.device("cpu"))
    other.load_state_dict(state)
    assert other.state_dict() == state and float(other.grad_scale()) == scale0 / 2
    plain = Precision("off", torch.device("cpu"))
    assert plain.grad_scale() is None and plain.step(opt) is True


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("applied", [False, True])
def test_store_update_follows_the_scalers_decision(pipeline: bool, applied: bool) -> None:
    """A finite head gradient on a step the scaler skipped: W stays, the store still completes the step."""
    K2, D2 = 20, 4
    store = WeightStore(K2, D2, seed=3, momentum=0.0, weight_decay=0.0)
    before = store.pull(np.arange(K2))
    head = SelectiveSoftmax(store, K2, D2, 5, margin="none", index="random", pipeline=pipeline)
    head.begin_step(0, 0.5, grad_scale=torch.tensor(8.0), labels=torch.tensor([1, 2]))
    loss = head(torch.randn(2, D2), torch.tensor([1, 2]))
    (loss * 8.0).backward()
    head.end_step(0, applied=applied)
    head.flush()
    assert store.step == 1
    assert (not np.array_equal(store.pull(np.arange(K2)), before)) == applied
    head.close()


def test_host_labels_are_used_by_the_head() -> None:
    """The head plans from the loader's host labels (no device-to-host copy); a mismatch in shape falls
    back to the labels the forward got."""
    K2, D2 = 20, 4
    store = WeightStore(K2, D2, seed=3)
    head = SelectiveSoftmax(store, K2, D2, 5, margin="none", index="random")
    head.begin_step(0, 0.0, labels=torch.tensor([3, 4]))
    head(torch.randn(2, D2), torch.tensor([3, 4]))
    assert set(head.last_active[:2]) == {3, 4}
    head.end_step(0)


def test_fp16_resume_equals_uninterrupted(tmp_path) -> None:
    """fp16 with a GradScaler: 3 steps, resume, 3 more == 6 straight, the scaler's state included."""
    base = ["data.num_classes=20", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=4",
            "data.val_pairs=20", "model.feature_dim=8", "model.width=4", "train.progress=false",
            "train.batch_size=8", "train.amp=fp16", "train.steps=6", "optim.lr=0.05", "train.deterministic=true"]
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_config(None, base + [f"train.out_dir={a}", "train.ckpt_every=3", "train.keep_every=3"]))
    b.mkdir()
    train(load_config(None, base + [f"train.out_dir={b}", f"train.resume={a / 'ckpt_00000003.pt'}"]))
    ca = torch.load(a / "ckpt_last.pt", weights_only=False)
    cb = torch.load(b / "ckpt_last.pt", weights_only=False)
    c3 = torch.load(a / "ckpt_00000003.pt", weights_only=False)
    assert ca["scaler"]["scale"] > 0 and ca["scaler"] == cb["scaler"]
    assert c3["scaler"]["_growth_tracker"] == 3        # three unskipped steps counted toward growth
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert not torch.equal(ca["head"]["weight"], c3["head"]["weight"])
    assert not torch.are_deterministic_algorithms_enabled()   # train() restored the global flags


def test_rng_states_of_more_gpus_than_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written where 9 GPUs were visible (older format: every GPU's state) resumes on
    cuda:0 (or cuda:3) with that GPU's state; the new format holds the rank's own device's only."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: (_ for _ in ()).throw(IndexError("all")))
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(9)]
    old = {**rng_state(), "cuda": states}
    set_rng_state(old, torch.device("cuda", 0))
    set_rng_state(old, torch.device("cuda", 3))
    assert [int(s[0]) for s, _ in calls] == [0, 3] and calls[1][1] == torch.device("cuda", 3)
    set_rng_state(old, torch.device("cuda", 12))           # no state for it: warned, not restored
    set_rng_state(old, torch.device("cpu"))
    assert len(calls) == 2
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), 7, dtype=torch.uint8))
    new = rng_state(torch.device("cuda", 1))
    assert int(new["cuda_device"][0]) == 7 and "cuda" not in new
    set_rng_state(new, torch.device("cuda", 0))
    assert int(calls[-1][0][0]) == 7


@pytest.mark.parametrize("env, device, message", [
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "cuda:0", "NPROC=2"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}, "auto", "NPROC=3 ranks on this node need GPU index 2"),
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "cuda:4", "train.device=cuda:4 need GPU index 4"),
])
def test_device_layouts_nccl_would_refuse(monkeypatch: pytest.MonkeyPatch, env: dict, device: str,
                                          message: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for k, v in {"RANK": env["LOCAL_RANK"], "WORLD_SIZE": env["LOCAL_WORLD_SIZE"], **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message) as e:
        hdist.init_distributed(device)
    assert "2 visible GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in str(e.value) or "same GPU" in str(e.value)


def test_config_words_off_and_on_are_strings() -> None:
    cfg = load_config(None, ["train.amp=off", "head.deterministic=on", "train.deterministic=true"])
    assert cfg.train.amp == "off" and cfg.head.deterministic == "on" and cfg.train.deterministic is True
    with pytest.raises(ConfigError, match="train.progress"):
        load_config(None, ["train.progress=yes"])       # bools are true / false


def test_backend_flags_set_and_restore() -> None:
    before = torch.get_float32_matmul_precision()
    with backend_flags(True, True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    with backend_flags(False, False):
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_float32_matmul_precision() == before


def test_ranks_wait_for_rank0s_evaluation_in_a_long_timeout_gloo_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """While rank 0 evaluates, the others wait in a barrier of a gloo group of their own whose timeout
    (hours) outlasts any evaluation, not in the default group bounded by its 600 s (NCCL's watchdog).
    Checked on the calls (a real wait past a short timeout would depend on the machine's load)."""
    import datetime

    import torch.distributed as dist
    made, barriers = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or f"group{len(made)}")
    monkeypatch.setattr(dist, "barrier", lambda group=None: barriers.append(group))
    monkeypatch.setattr(hdist, "_eval_groups", {})
    hdist.wait_for_main()
    hdist.wait_for_main()
    assert made == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=hdist.EVAL_WAIT_S)}]
    assert hdist.EVAL_WAIT_S >= 3600 and barriers == ["group1", "group1"]     # one group, reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host syncs: needs a GPU")
@pytest.mark.parametrize("name", ["full", "random", "mach"])
def test_no_host_sync_in_a_training_step_on_cuda(name: str) -> None:
    """One step as the loop runs it (host labels in, fp16 autocast and scaler, optimizer, end_step):
    no host sync but the scaler's own found-inf read (counted with torch.cuda.set_sync_debug_mode)."""
    import warnings

    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = HeadConfig(name=name, num_active=8)
    cfg.mach.num_hashes, cfg.mach.num_buckets = 2, 4
    store = WeightStore(K, D, seed=0) if name == "random" else None
    head = build_head(cfg, K, D, device=dev, store=store).to(dev)
    backbone = torch.nn.Linear(D, D).to(dev)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1)
    prec = Precision("fp16", dev)
    x, y = torch.randn(B, D).pin_memory(), torch.randint(0, K, (B,)).pin_memory()

    def step(s: int) -> None:
        if hasattr(head, "begin_step"):
            head.begin_step(s, 0.1, grad_scale=prec.grad_scale(), labels=y)
        with prec.autocast():
            loss = head(backbone(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        stepped = prec.step(opt)
        if hasattr(head, "end_step"):
            head.end_step(s, applied=stepped)

    step(0)                                          # warm-up: allocations, the first H2D buffers
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message)[:120] for w in syncs]
