"""The GPU path's CPU twins: what would run on a GPU host, checked where it can be seen on CPU
(the autocast state inside each wrapper, the device and accelerator chosen, the DeepSpeed
config handed over, the number of gradient all-reduces per iteration)."""
import pytest
import torch

from dist_harness import run_ranks
from tiny_models import batch, make_tiny


def _engine(env, kind, precision="fp32", lr=1e-2, seed=0):
    from omegaconf import OmegaConf

    from eglp_dist.config import EngineConfig, OptimConfig, ScheduleConfig
    from eglp_dist.runtime.engines import build_engine

    model = make_tiny(seed)
    ecfg = OmegaConf.structured(EngineConfig(kind=kind, precision=precision))
    return build_engine(kind, model, model.param_groups(lr, 0.01), OmegaConf.structured(OptimConfig(lr=lr)),
                        OmegaConf.structured(ScheduleConfig(warmup_iters=2)), 20, ecfg, env, torch.device("cpu"))


# -- 1: autocast inside the wrapper ---------------------------------------------------------

def _autocast_seen(env, kind):
    """(autocast enabled, its dtype) inside the model's forward, through the engine, with
    DeepSpeed seeing what it sees on CUDA: ``torch.is_autocast_enabled()`` without a device
    type reports CUDA's state only, so on CPU DeepSpeed would never notice an outer context;
    here it is made to ask about the device in use, as it does on a GPU."""
    import deepspeed.runtime.torch_autocast as ds_autocast

    plain = torch.is_autocast_enabled

    class DeviceAwareTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def is_autocast_enabled(*device):
            return plain(*(device or ("cpu",)))

    ds_autocast.torch = DeviceAwareTorch()
    eng = _engine(env, kind, precision="bf16")
    seen = []
    eng.model.encoder.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    x, y = batch(env.rank, 0)
    loss = eng.call("forward_train", x, y)
    eng.backward(loss)
    eng.step()
    return seen, torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_the_forward_inside_each_wrapper_runs_under_the_precision_asked_for(kind):
    for seen, after in run_ranks(_autocast_seen, 2, args=(kind,)):
        assert seen == [(True, torch.bfloat16)], seen
        assert not after  # nothing leaks out of the call


# -- 2: the device follows the group; DeepSpeed's accelerator follows the device -----------

def _gloo_on_a_gpu_host(env):
    """A gloo group on a host where torch reports a GPU: the device is the CPU, DeepSpeed's
    accelerator too, and a ZeRO engine trains on CPU tensors."""
    torch.cuda.device_count = lambda: 1
    torch.cuda.is_available = lambda: True
    from eglp_dist.runtime.env import init_distributed

    device = init_distributed(env, backend="auto")  # the group exists (gloo): it decides
    from deepspeed.accelerator import get_accelerator

    eng = _engine(env, "zero2")
    x, y = batch(env.rank, 0)
    eng.backward(eng.call("forward_train", x, y))
    eng.step()
    return str(device), get_accelerator().device_name(), str(next(eng.model.parameters()).device)


def test_a_gloo_run_on_a_gpu_host_stays_on_the_cpu():
    for device, accel, param_device in run_ranks(_gloo_on_a_gpu_host, 2):
        assert (device, accel, param_device) == ("cpu", "cpu", "cpu")


def test_an_accelerator_chosen_before_is_replaced(monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from eglp_dist.runtime.env import align_deepspeed_accelerator

    monkeypatch.setattr(real_accelerator, "ds_accelerator", CUDA_Accelerator())
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    align_deepspeed_accelerator(torch.device("cpu"))
    assert real_accelerator.get_accelerator().device_name() == "cpu"
    import os

    assert os.environ["DS_ACCELERATOR"] == "cpu"


# -- 3: one GPU per task -----------------------------------------------------------------

def test_one_gpu_per_task_maps_every_local_rank_to_the_visible_device():
    from eglp_dist.runtime.env import cuda_device_index, detect_env
    from eglp_dist.errors import ConfigError

    env = detect_env({"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
                      "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7"})
    assert (env.local_rank, env.local_world_size) == (3, 8)
    assert cuda_device_index(env.local_rank, env.local_world_size, visible=1) == 0  # --gpus-per-task=1
    assert cuda_device_index(env.local_rank, env.local_world_size, visible=8) == 3  # all GPUs visible
    with pytest.raises(ConfigError, match="local rank 3 sees 2 CUDA devices"):
        cuda_device_index(env.local_rank, env.local_world_size, visible=2)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        cuda_device_index(0, 1, visible=0)


def test_deepspeed_is_told_our_device_not_local_rank(monkeypatch):
    """DeepSpeed places the module on ``device_rank`` when it is given, else on LOCAL_RANK
    (which under one GPU per task names a device the task cannot see)."""
    import deepspeed

    seen = {}
    real = deepspeed.initialize

    def spy(*args, **kwargs):
        seen["args"] = kwargs.get("args")
        raise RuntimeError("stop here")

    monkeypatch.setattr(deepspeed, "initialize", spy)
    from eglp_dist.runtime.env import DistEnv

    with pytest.raises(RuntimeError, match="stop here"):
        _engine(DistEnv(local_rank=3, local_world_size=8), "zero2")
    assert seen["args"].device_rank == 0  # the CPU device here; cuda:N -> N
    assert real is not None


# -- 8: ZeRO buckets in elements ----------------------------------------------------------

def test_zero_buckets_are_the_same_bytes_as_ddps():
    from omegaconf import OmegaConf

    from eglp_dist.config import EngineConfig
    from eglp_dist.runtime.zero_engine import deepspeed_config

    cfg = deepspeed_config(OmegaConf.structured(EngineConfig(kind="zero2", bucket_mb=25)), world_size=2)
    zero = cfg["zero_optimization"]
    # DDP: bucket_cap_mb=25 -> 25 MiB of gradients; DeepSpeed counts fp32 elements
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 25 * 2 ** 20 // 4


# -- 7: one gradient all-reduce per iteration under DDP ------------------------------------

def _three_backwards(env, pattern, merged):
    """DACS' shape: three forward -> backward pairs per iteration (``pattern`` gives the count
    per iteration, to break the learned pattern); or, ``merged``, one backward of their sum
    (the reference). Returns the weights and the number of all-reduces per iteration."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    eng = _engine(env, "ddp")
    calls = []

    def counting(state, bucket):
        calls[-1] += 1
        return default_hooks.allreduce_hook(state, bucket)

    eng.wrapper.register_comm_hook(None, counting)
    order = []
    for step, n in enumerate(pattern):
        calls.append(0)
        x, y = batch(env.rank, step, n=2 * n)
        parts = list(zip(x.chunk(n), y.chunk(n)))
        if merged:
            eng.backward(sum(eng.call("forward_train", xs, ys) for xs, ys in parts) / n)
        elif n == 4:  # a forward before the previous one's backward: out of order
            losses = [eng.call("forward_train", xs, ys) for xs, ys in parts[:2]]
            for loss in reversed(losses):
                eng.backward(loss / n)
            for xs, ys in parts[2:]:
                eng.backward(eng.call("forward_train", xs, ys) / n)
        else:
            for xs, ys in parts:
                eng.backward(eng.call("forward_train", xs, ys) / n)
        eng.step()
        order.append(eng.sync.expected)
    return eng.state_dict_fp32(), calls, order


def test_ddp_reduces_once_per_iteration_and_trains_the_same():
    pattern = [3, 3, 3, 2, 3, 4, 3]
    ref = run_ranks(_three_backwards, 2, args=(pattern, True))
    out = run_ranks(_three_backwards, 2, args=(pattern, False))
    for rank in range(2):
        weights, calls, expected = out[rank]
        for k, v in ref[rank][0].items():
            torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
        buckets = ref[rank][1][1]  # one backward per iteration: the bucket count
        assert buckets >= 1
        # first: every backward syncs (nothing learned); then one reduction per iteration;
        # 2 forwards where 3 were learned: none synced, the explicit all-reduce (not a DDP
        # hook call) reduces them, and 2 is learned; so the next 3-forward iteration syncs its
        # second and reduces explicitly too; the out-of-order one likewise, after which
        # nothing is learned and every backward syncs again
        assert calls == [3 * buckets, buckets, buckets, 0, buckets, buckets, 3 * buckets], calls
        assert expected == [3, 3, 3, 2, 3, None, 3]
    assert torch.equal(out[0][0]["head.weight"], out[1][0]["head.weight"])  # one model


# -- 6: the sync-free versions give the results of the syncing ones ----------------------

def test_pixel_accuracy_without_mask_indexing_is_the_same():
    from eglp_dist.models.segmentor import pixel_accuracy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 16, 16, generator=g)
    seg = torch.randint(0, 5, (2, 16, 16), generator=g)
    seg[0, :5] = 255
    pred = logits.argmax(1)
    valid = seg != 255
    old = (pred[valid] == seg[valid]).float().mean() * 100  # the boolean-mask version
    assert torch.equal(pixel_accuracy(logits, seg), old)
    assert pixel_accuracy(logits, torch.full_like(seg, 255)).item() == 0.0  # nothing valid


def test_label_downscaling_by_scatter_add_equals_bincount():
    from eglp_dist.methods.parts.feature_distance import downscale_label_ratio

    g = torch.Generator().manual_seed(1)
    seg = torch.randint(0, 6, (3, 32, 48), generator=g)
    seg[seg == 5] = 255
    b, h, w, k1, scale = 3, 32, 48, 6, 4
    lab = torch.where(seg == 255, torch.full_like(seg, 5), seg)  # ignore -> class K=5
    cell = (torch.arange(h) // scale)[:, None] * (w // scale) + (torch.arange(w) // scale)[None, :]
    flat = ((torch.arange(b)[:, None, None] * (h // scale) * (w // scale) + cell[None]) * k1 + lab).flatten()
    counts = torch.bincount(flat, minlength=b * (h // scale) * (w // scale) * k1).view(b, h // scale, w // scale, k1)
    best_ratio, best = (counts.float() / scale ** 2).max(-1)
    want = torch.where(best == 5, torch.full_like(best, 255), best)
    want = torch.where(best_ratio < 0.5, torch.full_like(want, 255), want)
    assert torch.equal(downscale_label_ratio(seg, scale, 0.5, num_classes=5), want)
    with pytest.raises(ValueError, match="labels must lie in"):
        downscale_label_ratio(torch.full((1, 8, 8), 7), 4, 0.5, num_classes=5)


def test_classmix_with_the_loaders_counts_draws_the_same_masks():
    import numpy as np

    from eglp_dist.data.planning import collate_segs
    from eglp_dist.methods.parts.classmix import class_masks

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 19, (24, 32)).astype(np.uint8), np.full((16, 32), 3, np.uint8)]
    crops[0][rng.random((24, 32)) < 0.1] = 255
    seg, counts = collate_segs(crops, (24, 32), "cpu")  # the second is padded with 255
    # the plans' own counts (prefetch threads) + the batch padding: the same table
    _, from_plans = collate_segs(crops, (24, 32), "cpu", [np.bincount(c.ravel(), minlength=256) for c in crops])
    assert torch.equal(from_plans, counts)
    assert counts.device.type == "cpu" and counts.shape == (2, 256)
    for img, n in zip(seg, counts):
        assert torch.equal(torch.nonzero(n).flatten(), torch.unique(img))
        assert torch.equal(n, torch.bincount(img.flatten(), minlength=256))
    for seed in range(5):
        a = class_masks(seg, torch.Generator().manual_seed(seed))
        b = class_masks(seg, torch.Generator().manual_seed(seed), counts)
        assert torch.equal(a, b)


# -- 5: TF32 as a precision ----------------------------------------------------------------

def test_tf32_precision_switches_fp32_matmuls_to_tf32_and_fp32_back():
    from eglp_dist.runtime.env import DistEnv

    try:
        _engine(DistEnv(), "ddp", precision="tf32")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        _engine(DistEnv(), "ddp", precision="fp32")
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")
