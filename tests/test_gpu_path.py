"""The GPU path, checked on the CPU (docs/differences.md #16): what only a GPU would show, each item simulated.

- a resumed loop gets its restored tensors on the run's device (PromptSRC's GPA sum was left on the CPU);
- no image forward on an empty negative batch (CUDA's attention kernels refuse batch 0);
- bf16 only where the GPU has bf16 tensor cores (compute capability 8.0 on), the fp16 loss scale resumed;
- cosine logits in fp32 under autocast (bf16 logits tie close classes);
- `--device cuda:N` is the GPU used, named and cached by; evaluation goes through the patched autocast;
- no GPU->CPU wait per training step of stage 1.
"""
import contextlib
import os

import pytest
import torch

import clip_model
import command_line
import data
import precision
import prompts
import run_folder
import scoring
import toy_world
import train_backbone as tb
import train_dpc

CLASSES = ["red stripes", "green stripes", "blue stripes"]


def common(tmp_path, shots=2):
    return ["--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny", "--workers", "0",
            "--shots", str(shots), "--print-every", "100000"]


def crashing_loader(real, epoch):
    """data.make_loader that stops the run like Ctrl-C when asked for epoch `epoch`'s shuffled loader."""
    def make_loader(dataset, batch_size, shuffle, workers, seed=0, **kwargs):
        if shuffle and seed % 1000 == epoch:
            raise KeyboardInterrupt
        return real(dataset, batch_size, shuffle, workers, seed=seed, **kwargs)
    return make_loader


# -- 1. restored tensors on the run's device ------------------------------------------------------------

ARITHMETIC = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add, torch.add, torch.Tensor.add_,
              torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul, torch.Tensor.__sub__,
              torch.Tensor.sub, torch.sub}


class RestoredOnTheCPU(torch.Tensor):
    """A checkpoint tensor read with map_location="cpu" while the run computes on a GPU: arithmetic with the
    run's tensors fails as CUDA's device check does; .to(device) gives a plain tensor, as the move would."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone().to(*args[1:], **kwargs)
        if func in ARITHMETIC:
            raise RuntimeError("Expected all tensors to be on the same device (a restored tensor left on the CPU)")
        return super().__torch_function__(func, types, args, kwargs)


def test_the_simulated_device_mismatch_fails_like_cuda():
    t = torch.ones(3).as_subclass(RestoredOnTheCPU)
    with pytest.raises(RuntimeError, match="same device"):
        t + torch.ones(3)
    moved = t.to("cpu")
    assert type(moved) is torch.Tensor and torch.equal(moved + 1, torch.full((3,), 2.0))


@pytest.mark.slow
def test_a_resumed_promptsrc_run_adds_its_gpa_sum_on_the_run_device(tmp_path, monkeypatch):
    """--resume of PromptSRC (and so of every PromptKD teacher chain): the GPA sum read from the checkpoint
    is moved to --device before the next epoch adds to it; the resumed run ends as the straight one."""
    monkeypatch.chdir(tmp_path)
    flags = ["--learner", "promptsrc", "--epochs", "3", "--batch-size", "4"] + common(tmp_path)
    straight = tb.main(tb.get_args(flags + ["--output-dir", "straight"]))
    real_loader, real_check = data.make_loader, command_line.check_run_folder
    monkeypatch.setattr(data, "make_loader", crashing_loader(real_loader, 3))
    with pytest.raises(SystemExit):
        tb.run(flags + ["--output-dir", "cut"])
    monkeypatch.setattr(data, "make_loader", real_loader)

    def restored_on_the_cpu(*args, **kwargs):
        previous = real_check(*args, **kwargs)
        assert previous is not None and previous["gpa_sum"]
        previous["gpa_sum"] = {n: t.as_subclass(RestoredOnTheCPU) for n, t in previous["gpa_sum"].items()}
        return previous
    monkeypatch.setattr(command_line, "check_run_folder", restored_on_the_cpu)
    resumed = tb.main(tb.get_args(flags + ["--output-dir", "cut", "--resume"]))
    assert resumed == straight
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "cut"))
    assert all(torch.equal(a["gpa_sum"][n], b["gpa_sum"][n]) for n in a["gpa_sum"])


def test_to_device_moves_every_tensor():
    moved = precision.to_device({"a": torch.ones(2), "b": torch.zeros(3, 4)}, "meta")
    assert all(t.device.type == "meta" for t in moved.values()) and precision.to_device(None, "meta") is None


# -- 2. no forward on an empty negative batch ------------------------------------------------------------

class NoNegatives:
    """A sampler whose filtering left no negative at all (possible with --min-negatives 0)."""
    def sample(self, scores, labels):
        return train_dpc.HardNegativeBatch(positives=list(range(len(labels))), pair_labels=labels.tolist(),
                                           negative_images=[])


@pytest.mark.parametrize("name", ["coop", "maple"])
def test_a_step_without_negatives_runs_no_empty_image_forward(name, monkeypatch):
    clip = clip_model.random_clip("tiny", seed=0)
    torch.manual_seed(0)
    learner = prompts.build_learner(name, clip).eval()
    real = clip_model.CLIP.encode_image

    def refuses_batch_0(self, image, *args, **kwargs):
        assert image.shape[0] > 0, "an image forward on an empty batch (CUDA's attention kernels refuse it)"
        return real(self, image, *args, **kwargs)
    monkeypatch.setattr(clip_model.CLIP, "encode_image", refuses_batch_0)
    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(learner).items()}
    parallel = train_dpc.initial_parallel_prompt(tuned)
    with torch.no_grad():
        tuned_text = torch.nn.functional.normalize(learner.encode_text(CLASSES).float(), dim=-1)
    pool = data.ImageDataset([data.Item(p, 0, CLASSES[0]) for p in fake_images(2)], data.train_transform(32))
    step = train_dpc.dpc_step(learner, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]), NoNegatives(), pool, None,
                              tuned, tuned_text, parallel, CLASSES, 100.0, "cpu")
    step.loss.backward()
    assert step.pairs == 2 and torch.isfinite(step.loss) and parallel["ctx"].grad is not None


# -- 3. bf16 only with bf16 tensor cores; the fp16 loss scale resumed -------------------------------------

@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_bf16_is_chosen_by_compute_capability_not_by_emulation(capability, dtype, monkeypatch):
    """V100 (7.0) and T4 (7.5) emulate bf16, and torch.cuda.is_bf16_supported() says yes there: fp16."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert precision.compute_dtype("cuda:1") == dtype and asked == [torch.device("cuda:1")]
    assert precision.compute_dtype("cpu") == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["backbone", "dpc"])
def test_a_resumed_fp16_run_keeps_its_loss_scale(stage, tmp_path, monkeypatch):
    """fp16 autocast with loss scaling (as on a V100/T4), interrupted and resumed: the scaler's state is in the
    checkpoint and comes back, so the resumed run ends bit for bit as the straight one, scale included."""
    monkeypatch.chdir(tmp_path)
    # 4 train and 2 test images a class (the default: 20 and 4): the scale is what is compared
    toy_world.make_synthetic_imagefolder(str(tmp_path / "data"), "synthetic", n_train=4, n_val=0, n_test=2)
    monkeypatch.setattr(precision, "autocast", lambda device: torch.autocast("cpu", dtype=torch.float16))
    monkeypatch.setattr(precision, "grad_scaler", lambda device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8,
                                                                                   growth_interval=2))
    if stage == "backbone":
        module, flags = tb, ["--learner", "coop", "--epochs", "3", "--batch-size", "4"] + common(tmp_path)
    else:
        tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "4", "--output-dir", "b"]
                            + common(tmp_path)))
        module, flags = train_dpc, ["--backbone", "b", "--epochs", "3", "--workers", "0", "--shots", "2",
                                    "--print-every", "100000"]
    straight = module.main(module.get_args(flags + ["--output-dir", "straight"]))
    real = data.make_loader
    monkeypatch.setattr(data, "make_loader", crashing_loader(real, 3))
    with pytest.raises(SystemExit):
        module.run(flags + ["--output-dir", "cut"])
    monkeypatch.setattr(data, "make_loader", real)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["scaler"]
    assert saved["scale"] > 2.0 ** 8            # it grew in two epochs
    resumed = module.main(module.get_args(flags + ["--output-dir", "cut", "--resume"]))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "cut"))
    assert resumed == straight and a["scaler"] == b["scaler"]


# -- 4. cosine logits in fp32 under autocast ------------------------------------------------------------

def test_close_cosines_stay_apart_under_bf16_autocast():
    """Two classes at cosine 0.3019 and 0.3025: bf16 rounds both to 0.3027 and argmax would pick class 0."""
    image = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[0.3019, (1 - 0.3019 ** 2) ** 0.5], [0.3025, -(1 - 0.3025 ** 2) ** 0.5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prompts.cosine_logits(image, text, 1.0)
        bf16 = (image.bfloat16() @ text.bfloat16().t())       # what a matmul under autocast gives
    assert logits.dtype == torch.float32 and logits.argmax().item() == 1
    assert bf16[0, 0] == bf16[0, 1]                             # the tie the fp32 logits avoid


def make_learner(name):
    clip = clip_model.random_clip("tiny", seed=0)
    teacher = prompts.PromptSRC(clip_model.random_clip("tiny", seed=1)) if name == "promptkd" else None
    torch.manual_seed(0)
    return prompts.build_learner(name, clip, teacher).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS) + ["dept"])
def test_logits_and_training_logits_are_fp32_under_bf16_autocast(name):
    learner = make_learner("coop" if name == "dept" else name)
    if name == "dept":
        learner = prompts.DePT(learner, CLASSES)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = learner(images, CLASSES)
        image, text = learner.encode_image(images), learner.encode_text(CLASSES)
        out = learner.training_loss(images, labels, CLASSES)
    assert image.dtype == torch.bfloat16   # the towers stay in autocast
    assert logits.dtype == torch.float32 and out["logits"].dtype == torch.float32, (logits.dtype, out["logits"].dtype)
    if name != "dept":
        expected = prompts.cosine_logits(image.float(), text.float(), learner.clip.logit_scale.exp())
        assert torch.equal(logits, expected)


def test_promptkd_distils_from_fp32_teacher_logits(monkeypatch):
    learner = make_learner("promptkd")
    seen = {}
    real = torch.nn.functional.kl_div

    def kl_div(input, target, *args, **kwargs):
        seen["dtypes"] = (input.dtype, target.dtype)
        return real(input, target, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "kl_div", kl_div)
    real_dot = prompts.scaled_dot
    calls = []
    monkeypatch.setattr(prompts, "scaled_dot", lambda *a: calls.append(1) or real_dot(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        learner.training_loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CLASSES)
    assert seen["dtypes"] == (torch.float32, torch.float32) and len(calls) == 2   # teacher's and student's logits


def test_evaluation_runs_under_the_stages_autocast(monkeypatch):
    """scoring uses precision.autocast, so a test (or a fix) that patches it reaches evaluation too; evaluation
    under bf16 autocast scores with fp32 logits of the bf16 features."""
    entered = []

    @contextlib.contextmanager
    def bf16(device):
        entered.append(device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    monkeypatch.setattr(precision, "autocast", bf16)
    learner = make_learner("coop")
    items = [data.Item(p, i % 3, CLASSES[i % 3]) for i, p in enumerate(fake_images(6))]
    acc = scoring.accuracy(learner, items, CLASSES, "cpu", cache="off")
    assert entered == ["cpu"] and 0 <= acc <= 100


def fake_images(n):
    import tempfile
    from PIL import Image
    folder = tempfile.mkdtemp()
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i}.png")
        Image.new("RGB", (40, 40), (40 * i % 255, 90, 200)).save(path)
        paths.append(path)
    return paths


# -- 5. --device cuda:N ----------------------------------------------------------------------------------

def test_the_feature_cache_keys_a_gpu_by_model_not_by_its_name(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    learner = make_learner("coop")
    items = [data.Item(p, 0, CLASSES[0]) for p in fake_images(2)]
    keys = {d: scoring.feature_key(learner, items, d, 100)[0] for d in ("cuda", "cuda:0", "cuda:1", "cpu")}
    assert keys["cuda"] == keys["cuda:0"] == keys["cuda:1"] != keys["cpu"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))   # a V100: fp16
    assert scoring.feature_key(learner, items, "cuda", 100)[0] != keys["cuda"]


def test_device_cuda_n_becomes_the_current_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    tb.get_args(["--learner", "coop", "--data", "toy", "--device", "cuda:1"])   # checks the flags
    assert chosen and all(torch.device(d) == torch.device("cuda:1") for d in chosen)
    with pytest.raises(run_folder.RunError, match="not available"):
        tb.get_args(["--learner", "coop", "--data", "toy", "--device", "cuda:2"])


# -- 7. no GPU->CPU wait per training step ---------------------------------------------------------------

SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "__index__")


@pytest.mark.slow
def test_stage_1_waits_for_the_device_per_epoch_not_per_step(tmp_path, monkeypatch):
    """Reading a tensor's value (item, bool, int, tolist, ...) makes the CPU wait for the GPU. Stage 1's steps
    read none: the NaN check and the EOT length come without one. Counted over a 1-epoch run with 8 and with
    16 steps: the same number of reads (the printed line, evaluation), none per step."""
    monkeypatch.chdir(tmp_path)
    counts = {}

    def count(name):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(self, *args, **kwargs)
        return counted

    def syncs(batch_size, out):
        counts.clear()
        with monkeypatch.context() as m:
            for name in SYNCS:
                m.setattr(torch.Tensor, name, count(name))
            tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", str(batch_size),
                                 "--output-dir", out] + common(tmp_path, shots=16)))
        return dict(counts)
    tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "10", "--output-dir", "warm"]
                        + common(tmp_path, shots=16)))   # data written and features cached before counting
    steps_16, steps_8 = syncs(5, "a"), syncs(10, "b")
    assert steps_16 == steps_8, (steps_16, steps_8)


@pytest.mark.slow
def test_gpu_runs_load_batches_into_pinned_memory(tmp_path, monkeypatch):
    """A GPU run's loaders pin their batches (a non_blocking copy from pageable memory waits); a CPU run's do not."""
    pins = []
    real = data.make_loader
    monkeypatch.setattr(data, "make_loader", lambda *a, **k: pins.append(k.get("pin")) or real(*a, **k))
    monkeypatch.chdir(tmp_path)
    tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "4", "--output-dir", "o"]
                        + common(tmp_path)))
    assert pins and not any(pins)
    loader = real(data.ImageDataset([data.Item(p, 0, CLASSES[0]) for p in fake_images(2)], data.test_transform(32)),
                  2, False, 0, pin=True)
    assert loader.pin_memory
