"""Fine-tuning: training recovers a damaged CP rewrite (labels and distillation), gradients reach
the whole CP chain, write-back is exact and checked, checkpoints resume exactly, the CLI works."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import model_factory
import onnx_cp
from onnx_cp.cli import main as cli_main
from onnx_cp.errors import OnnxCpError, UsageError
from onnx_cp.finetune import finetune, ops, to_torch, train, write_back
from onnx_cp.settings import LayerSelection, SolverSettings

torch.set_num_threads(1)
CLASSES = 4


def oriented_gratings(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N x 3 x 16 x 16 noisy sine gratings; the class is the orientation (0, 45, 90, 135 deg).
    Position-invariant, so the tiny CNN (global average pooling) learns it in one epoch."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    angle = y * np.pi / CLASSES
    yy, xx = np.mgrid[0:16, 0:16]
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    img = np.sin(proj * 1.3 + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    x = img[:, None] * rng.uniform(0.5, 1.5, (n, 3, 1, 1)) + rng.standard_normal((n, 3, 16, 16)) * 0.5
    return x.astype(np.float32), y.astype(np.int64)


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def data():
    return oriented_gratings(384, 0), oriented_gratings(256, 1)


RANK = 4


def low_rank_tiny_cnn(seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """tiny_cnn whose 5x5 conv2 starts as an exact rank-4 CP kernel (so that after training it
    is close to rank 4, as the layers CP is meant for), and those factors."""
    rng = np.random.default_rng(100 + seed)
    factors = [rng.standard_normal((n, RANK)) for n in (32, 16, 5, 5)]
    kernel = np.einsum("tr,sr,yr,xr->tsyx", *factors)
    model = model_factory.tiny_cnn(num_classes=CLASSES, seed=seed)
    for init in model.graph.initializer:
        if init.name == "conv2.weight":
            init.CopyFrom(numpy_helper.from_array((kernel * 0.05 / kernel.std()).astype(np.float32), init.name))
    return model, factors


def als(kernel: np.ndarray, factors: list[np.ndarray], iters: int = 25) -> list[np.ndarray]:
    """Plain CP-ALS from given factors: the test's own solver, so that what it measures does not
    move when onnx_cp.cp changes."""
    k = kernel.astype(np.float64)
    f = [np.array(x, dtype=np.float64) for x in factors]
    letters = "tsyx"
    for _ in range(iters):
        for m in range(4):
            others = [i for i in range(4) if i != m]
            spec = ",".join(f"{letters[i]}r" for i in others) + "->" + "".join(letters[i] for i in others) + "r"
            khatri_rao = np.einsum(spec, *[f[i] for i in others]).reshape(-1, RANK)
            unfolded = np.moveaxis(k, m, 0).reshape(k.shape[m], -1)
            f[m] = np.linalg.lstsq(khatri_rao, unfolded.T, rcond=None)[0].T
    return f


@pytest.fixture(scope="module")
def trained(data):
    (xt, yt), (xv, yv) = data
    model, _ = low_rank_tiny_cnn()
    result = finetune(model, (xt, yt), val=(xv, yv), epochs=3, lr=0.05, optimizer="sgd")
    assert accuracy(result.model, xv, yv) >= 0.95
    return result.model


@pytest.fixture(scope="module")
def damaged(trained):
    """conv2 CP-rewritten at rank 4 by the real splice (factors from the test's ALS), then its
    vertical factor perturbed by noise as large as itself: accuracy falls to chance."""
    kernel = next(numpy_helper.to_array(i) for i in trained.graph.initializer if i.name == "conv2.weight")
    fitted = als(kernel, low_rank_tiny_cnn()[1])
    rewritten = onnx_cp.optimize(trained, RANK, layers=LayerSelection("conv2"),
                                 solver=SolverSettings(workers=1, decomposer=lambda k, r: fitted)).model
    for init in rewritten.graph.initializer:
        if init.name == "conv2/cp/vertical.weight":
            w = numpy_helper.to_array(init)
            noise = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w + noise * np.abs(w).mean(), init.name))
    return rewritten


def test_cp_rewrite_is_what_we_expect(damaged):
    names = [n.name for n in damaged.graph.node]
    assert [n for n in names if n.startswith("conv2/cp/")] == [
        "conv2/cp/in",
        "conv2/cp/vertical",
        "conv2/cp/horizontal",
        "conv2/cp/out",
    ]


def test_finetuning_recovers_a_damaged_cp_rewrite(damaged, data):
    (xt, yt), (xv, yv) = data
    before = accuracy(damaged, xv, yv)
    result = finetune(damaged, (xt, yt), val=(xv, yv), epochs=3, lr=0.05, seed=0, optimizer="sgd")
    after = accuracy(result.model, xv, yv)
    assert before <= 0.6  # the damage is real
    assert after >= before + 0.3 and after >= 0.85
    # the reported history agrees with onnxruntime on the written model
    assert result.metric == "val_accuracy"
    assert result.metric_at(0) == pytest.approx(before)
    assert result.metric_at(result.best_epoch) == pytest.approx(after)
    assert result.best_epoch == max(range(len(result.history)), key=result.metric_at)


def test_default_settings_recover_without_a_learning_rate(damaged, data):
    """The defaults (AdamW 3e-3, 5% warm-up, cosine) need no hand-set learning rate."""
    (xt, yt), (xv, yv) = data
    before = accuracy(damaged, xv, yv)
    result = finetune(damaged, (xt, yt), val=(xv, yv), epochs=3)
    assert accuracy(result.model, xv, yv) >= max(0.7, before + 0.4)
    old_defaults = finetune(damaged, (xt, yt), val=(xv, yv), epochs=3, optimizer="sgd", warmup=0.0)
    assert accuracy(old_defaults.model, xv, yv) <= before + 0.1  # SGD at 1e-3 barely moves in 36 steps


def assert_probe_rule(trials: list[dict], key: str, better) -> None:
    """The probe's rates: the default times LR_PROBE_FACTORS, then one step lower at a time while the
    lowest so far scored best, at most LR_PROBE_EXTRA times."""
    rates, scores = [t["lr"] for t in trials], [t[key] for t in trials]
    first = len(train.LR_PROBE_FACTORS)
    assert rates[:first] == pytest.approx([train.DEFAULT_LR["adamw"] * f for f in train.LR_PROBE_FACTORS])
    assert len(rates) <= first + train.LR_PROBE_EXTRA
    step = train.LR_PROBE_FACTORS[-1] / train.LR_PROBE_FACTORS[-2]
    for i in range(first, len(rates)):
        assert rates[i] == pytest.approx(rates[i - 1] * step)
        assert better(scores[:i]) == i - 1  # it went on only because the lowest rate had won
    if len(rates) < first + train.LR_PROBE_EXTRA:
        assert better(scores) != len(scores) - 1


def test_without_a_learning_rate_a_probe_picks_the_best_scoring_one_and_leaves_the_model_as_it_was(damaged, data):
    (xt, yt), (xv, yv) = data
    result = finetune(damaged, (xt, yt), val=(xv, yv), steps=train.LR_PROBE_MIN_TOTAL)
    assert_probe_rule(result.lr_probe, "val_accuracy", lambda s: int(np.argmax(s)))
    rates = [t["lr"] for t in result.lr_probe]
    scores = [t["val_accuracy"] for t in result.lr_probe]
    assert result.lr == rates[int(np.argmax(scores))]
    # the probes trained copies: the run itself starts from the damaged model
    assert result.metric_at(0) == pytest.approx(accuracy(damaged, xv, yv))
    given = finetune(damaged, (xt, yt), val=(xv, yv), steps=train.LR_PROBE_MIN_TOTAL, lr=0.01)
    assert given.lr == 0.01 and given.lr_probe == []
    short = finetune(damaged, (xt, yt), val=(xv, yv), steps=train.LR_PROBE_MIN_TOTAL - 1)
    assert short.lr == train.DEFAULT_LR["adamw"] and short.lr_probe == []


def test_without_validation_data_the_probe_is_judged_on_training_samples(damaged, trained, data):
    (xt, _), _ = data
    result = finetune(damaged, xt, teacher=trained, steps=train.LR_PROBE_MIN_TOTAL)
    assert_probe_rule(result.lr_probe, "val_worst_group_error", lambda s: int(np.argmin(s)))
    errors = [t["val_worst_group_error"] for t in result.lr_probe]
    assert result.lr == result.lr_probe[int(np.argmin(errors))]["lr"]


def test_when_every_probed_rate_makes_validation_worse_no_epoch_is_trained(trained, data):
    """The model already is its teacher; wrong labels pull it away at any rate, so the probe's best
    scores worse than the model as it came, and the run returns it untrained instead of spending
    the epochs to keep epoch 0."""
    (xt, yt), (xv, yv) = data
    wrong = (yt + 1) % CLASSES
    result = finetune(trained, (xt, wrong), val=xv, teacher=trained, steps=4 * train.LR_PROBE_MIN_TOTAL)
    assert result.lr_probe and all(t["val_worst_group_error"] > 0 for t in result.lr_probe)
    assert result.skipped and "worse" in result.skipped
    assert [row["epoch"] for row in result.history] == [0] and result.best_epoch == 0
    assert result.history[0]["val_worst_group_error"] < 1e-5  # the model as it came, written back
    assert accuracy(result.model, xv, yv) == accuracy(trained, xv, yv)
    kept = finetune(trained, (xt, wrong), val=xv, teacher=trained, steps=4 * train.LR_PROBE_MIN_TOTAL, lr=1e-3)
    assert kept.skipped is None and len(kept.history) > 1  # a given rate is not probed, so it trains


def test_distillation_needs_no_labels(damaged, trained, data):
    (xt, _), (xv, yv) = data
    before = accuracy(damaged, xv, yv)
    result = finetune(damaged, xt, val=xv, teacher=trained, epochs=3, lr=0.05, optimizer="sgd")
    assert result.metric == "val_worst_group_error"  # minimised: the best epoch has the lowest
    best = result.history[result.best_epoch]
    assert best["val_worst_group_error"] == min(r["val_worst_group_error"] for r in result.history)
    assert best["val_worst_group_error"] <= 0.7 * result.metric_at(0)
    assert best["val_agreement"] >= result.history[0]["val_agreement"] + 0.3
    assert accuracy(result.model, xv, yv) >= before + 0.3


def test_gradients_reach_every_parameter_of_the_cp_chain(damaged, data):
    (xt, yt), _ = data
    module = to_torch(damaged).train()
    loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(xt[:16])), torch.from_numpy(yt[:16]))
    loss.backward()
    params = module.onnx_parameters()
    chain = [n for n in params if "/cp/" in n]
    assert sorted(chain) == sorted(f"conv2/cp/{s}.weight" for s in ("in", "vertical", "horizontal", "out"))
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _strip_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.initializer[:]
    for node in copy.graph.node:
        if node.op_type == "Constant":
            del node.attribute[:]
    return copy


@pytest.mark.parametrize("weight_as", ["initializer", "constant"])
def test_write_back_round_trip_is_exact_and_keeps_structure(weight_as):
    kernel = model_factory.low_rank_kernel(6, 4, 3, 3, 2).astype(np.float32)
    model = model_factory.conv_model(kernel, np.ones(6, np.float32), weight_as=weight_as)
    model.metadata_props.add(key="author", value="test")
    module = to_torch(model)
    state = {k: v + np.float32(0.125) for k, v in module.onnx_state().items()}
    written = write_back(model, state)
    module2 = to_torch(written)
    for name, array in module2.onnx_state().items():
        np.testing.assert_array_equal(array, state[name])
    assert _strip_initializers(written).SerializeToString() == _strip_initializers(model).SerializeToString()
    assert [n.name for n in written.graph.node] == [n.name for n in model.graph.node]
    assert written.opset_import == model.opset_import and written.ir_version == model.ir_version


def test_write_back_keeps_the_original_dtype():
    kernel = model_factory.low_rank_kernel(4, 4, 3, 3, 2).astype(np.float16)
    model = model_factory.conv_model(kernel)
    state = {"W": np.full(kernel.shape, 0.5, np.float32)}
    written = write_back(model, state, check=False)
    assert written.graph.initializer[0].data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(written.graph.initializer[0]).dtype == np.float16


def test_write_back_check_catches_a_mismatch(monkeypatch):
    model = model_factory.tiny_cnn()
    state = to_torch(model).onnx_state()
    monkeypatch.setitem(ops.OPS, "Relu", lambda node, inputs, ctx: inputs[0])  # a wrong kernel
    with pytest.raises(OnnxCpError, match="write-back check failed"):
        write_back(model, state)


def test_write_back_refuses_unknown_names_and_shapes():
    model = model_factory.tiny_cnn()
    with pytest.raises(OnnxCpError, match="'nope'"):
        write_back(model, {"nope": np.zeros(3, np.float32)})
    with pytest.raises(OnnxCpError, match="shape"):
        write_back(model, {"fc.bias": np.zeros(3, np.float32)})


def _bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 6
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in [
            ("w", rng.standard_normal((c, 3, 3, 3)) * 0.3),
            ("bn.s", np.ones(c)),
            ("bn.b", np.zeros(c)),
            ("bn.m", rng.standard_normal(c) * 0.1),
            ("bn.v", np.ones(c) * 2),
            ("fc.w", rng.standard_normal((c, CLASSES)) * 0.3),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc.w"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        inits,
    )
    return model_factory.make_model(graph)


def _init(model, name):
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_batchnorm_statistics_frozen_by_default(data):
    (xt, yt), _ = data
    model = _bn_model()
    frozen = finetune(model, (xt[:64], yt[:64]), epochs=1, lr=0.01, optimizer="sgd").model
    np.testing.assert_array_equal(_init(frozen, "bn.m"), _init(model, "bn.m"))
    np.testing.assert_array_equal(_init(frozen, "bn.v"), _init(model, "bn.v"))
    assert not np.array_equal(_init(frozen, "bn.s"), _init(model, "bn.s"))  # affine trains
    free = finetune(model, (xt[:64], yt[:64]), epochs=1, lr=0.01, optimizer="sgd", freeze_bn=False).model
    assert not np.array_equal(_init(free, "bn.m"), _init(model, "bn.m"))


def test_dropout_active_in_training_only():
    module = to_torch(_bn_model())
    x = torch.from_numpy(oriented_gratings(8, 5)[0])
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_checkpoint_resume_equals_an_uninterrupted_run(damaged, data, tmp_path, monkeypatch, optimizer):
    (xt, yt), (xv, yv) = data
    args = {"val": (xv[:64], yv[:64]), "epochs": 3, "lr": 0.02 if optimizer == "sgd" else 0.003, "seed": 5,
            "keep": "last", "optimizer": optimizer, "warmup": 0.2}
    straight = finetune(damaged, (xt[:128], yt[:128]), **args)
    ckpt = tmp_path / "run.ckpt"
    real_epoch = train._Trainer._train_epoch

    def crash_in_epoch_3(self, *a):
        if self.epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, *a)

    monkeypatch.setattr(train._Trainer, "_train_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(damaged, (xt[:128], yt[:128]), checkpoint=ckpt, **args)
    assert ckpt.exists() and not list(tmp_path.glob(".ckpt-*"))
    monkeypatch.setattr(train._Trainer, "_train_epoch", real_epoch)
    resumed = finetune(damaged, (xt[:128], yt[:128]), checkpoint=ckpt, resume=True, **args)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    for name, array in straight.state.items():
        np.testing.assert_array_equal(resumed.state[name], array, err_msg=name)
    with pytest.raises(OnnxCpError, match="different model"):
        finetune(
            model_factory.tiny_cnn(num_classes=CLASSES, channels=8),
            (xt[:32], yt[:32]),
            checkpoint=ckpt,
            resume=True,
            epochs=4,
        )


def test_momentum_sgd_equals_torch_optim_sgd():
    """MomentumSGD stands in for torch.optim.SGD (which costs seconds of torch._dynamo import):
    with momentum, weight decay and a changing learning-rate factor the weights stay identical."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(5)]
    batches = [torch.randn(8, 3) for _ in range(6)]

    def trained(make_optimizer, step) -> list[torch.Tensor]:
        params = [w.clone().requires_grad_(True) for w in start]
        optimizer = make_optimizer(params)
        for i, x in enumerate(batches):
            loss = ((x @ params[0].T).tanh().sum(1) ** 2).mean() + (params[1] ** 3).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step(optimizer, 0.5 ** i)
        return [p.detach() for p in params]

    def torch_step(optimizer, factor):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * factor
        optimizer.step()

    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}
    ours = trained(lambda p: train.MomentumSGD(p, **options), lambda o, f: o.step(f))
    reference = trained(lambda p: torch.optim.SGD(p, **options), torch_step)
    assert not torch.equal(ours[0], start[0])
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)


def test_warmup_then_cosine():
    trainer = train._Trainer.__new__(train._Trainer)
    trainer.schedule, trainer.warmup = "cosine", 0.25
    trainer.configure(8, 4)
    factors = [trainer._lr_factor(step) for step in range(8)]
    assert factors[:2] == [0.5, 1.0]  # linear warm-up over 2 of 8 steps
    assert factors[2] == 1.0 and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 6)))


def test_steps_limit_training_length(data):
    (xt, yt), _ = data
    result = finetune(model_factory.tiny_cnn(num_classes=CLASSES), (xt, yt), steps=5, batch_size=16)
    assert result.history[-1]["step"] == 5 and result.history[-1]["epoch"] == 1


def test_user_errors_are_one_line(data):
    (xt, yt), _ = data
    model = model_factory.tiny_cnn(num_classes=CLASSES)
    with pytest.raises(UsageError, match="no labels"):
        finetune(model, xt, epochs=1)
    with pytest.raises(OnnxCpError, match=r"shape \(3, 8, 8\).*expects"):
        finetune(model, (xt[:, :, :8, :8], yt), epochs=1)
    with pytest.raises(UsageError, match="learning rate"):
        finetune(model, (xt, yt), lr=0)
    with pytest.raises(OnnxCpError, match="lower the learning rate"):
        finetune(model, (xt[:64], yt[:64]), lr=1e30, epochs=1)


def test_cli_finetune_with_teacher_and_history(damaged, trained, data, tmp_path, capsys):
    (xt, _), (xv, yv) = data
    onnx.save(damaged, tmp_path / "cp.onnx")
    onnx.save(trained, tmp_path / "orig.onnx")
    np.savez(tmp_path / "train.npz", x=xt)
    np.savez(tmp_path / "val.npz", x=xv, y=yv)
    out = tmp_path / "tuned.onnx"
    code = cli_main(
        [
            "finetune",
            str(tmp_path / "cp.onnx"),
            str(out),
            "--data",
            str(tmp_path / "train.npz"),
            "--val",
            str(tmp_path / "val.npz"),
            "--teacher",
            str(tmp_path / "orig.onnx"),
            "--epochs",
            "3",
            "--lr",
            "0.05",
            "--optimizer",
            "sgd",
            "--history",
            str(tmp_path / "h.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept epoch" in printed and "val_accuracy" in printed
    tuned = onnx.load(out)
    assert accuracy(tuned, xv, yv) >= accuracy(damaged, xv, yv) + 0.3
    code = cli_main(["finetune", str(tmp_path / "cp.onnx"), str(out), "--data", str(tmp_path / "train.npz")])
    assert code == 2 and "no labels" in capsys.readouterr().err


def test_the_write_back_check_reads_real_samples_where_random_inputs_mislead():
    """A Sigmoid saturated on random inputs (PP-OCRv4's text map): onnxruntime approximates its
    tail, so the two runtimes differ by a large relative amount there and agree on real inputs.
    fine-tune checks on its training samples, which these stand for."""
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    b = numpy_helper.from_array(np.array([-30.0], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])], [w, b])
    model = model_factory.make_model(graph)
    with pytest.raises(OnnxCpError, match="write-back check failed"):
        write_back(model, {})  # random inputs: the saturated tail
    samples = 30 + np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    written = write_back(model, {"b": np.array([-29.0], np.float32)}, feeds={"x": samples})
    assert numpy_helper.to_array(written.graph.initializer[1]).tolist() == [-29.0]
