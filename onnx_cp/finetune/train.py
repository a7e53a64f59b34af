"""Fine-tune an ONNX model with backpropagation: supervised, or distilled from a teacher model.

The ONNX graph runs in PyTorch through the interpreter; AdamW (or SGD with momentum), linear warm-up
and a cosine (or step) schedule; BatchNorm statistics frozen unless asked otherwise (dropout stays active); validation
after every epoch and the best epoch kept; checkpoints that resume exactly (the data order and
dropout seeds are functions of (seed, epoch), not of a random state carried along). The trained
weights are written back into the original graph and checked against onnxruntime.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnx_cp import progress
from onnx_cp.errors import OnnxCpError, UsageError, first_line
from onnx_cp.finetune import distributed
from onnx_cp.finetune.augment import Augmentation, augmentation_for, augmented
from onnx_cp.finetune.interpreter import OnnxModule, channels_last, to_torch
from onnx_cp.finetune.writeback import write_back
from onnx_cp.runtime import model_io
from onnx_cp.runtime.fidelity import (
    BOX_ROWS,
    CHANNEL_FLOOR,
    CLASS_SCORES,
    DETECTIONS,
    SEQUENCE,
    compare_output,
    output_kind,
)
from onnx_cp.runtime.files import atomic_write
from onnx_cp.runtime.inputs import fixed_batch
from onnx_cp.runtime.session import ort_session
from onnx_cp.runtime.tensors import single_input

DataLike = Any  # a path, a Dataset, (x, y) arrays or an x array  # path, (x, y) arrays, or a Dataset
DEFAULT_EPOCHS = 5
EVAL_BATCH = 256
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
# Chosen by measurement (charnet, every conv at CP rank 8, 2 epochs of 20000 labelled images, see the
# distill branch's report): AdamW 3e-3 with 5% linear warm-up and cosine decay beat SGD with momentum
# at 1e-3 (the old default) and 1e-2 (with warm-up), and AdamW at 1e-3 and 1e-2.
DEFAULT_OPTIMIZER = "adamw"
DEFAULT_LR = {"sgd": 0.001, "adamw": 0.003}
DEFAULT_WARMUP = 0.05
# Without a given lr, a short probe picks the peak among the default and two lower ones: a model that
# starts close to its teacher (CP chains fitted by reconstruction) is wrecked by the default. Measured
# on charnet at ranks 32/64 after reconstruction: AdamW 3e-3 took validation from 85.3% to 20.0% in
# the first epoch, and 8 epochs ended at 89.1%.
LR_PROBE_FACTORS = (1.0, 0.3, 0.1)
# While the smallest rate probed scores best, the probe goes on down by LR_PROBE_FACTORS' step, at
# most this many times more (distilling NudeNet's YOLOv8n and ddddocr's CRNN on 400 unlabelled
# samples, 3e-4 was the best of the three, and every rate still hurt the held-out fidelity at first).
LR_PROBE_EXTRA = 2
LR_PROBE_SHARE = 0.05  # of the training steps, per candidate
LR_PROBE_MIN_STEPS = 10  # per candidate: short runs need the probe most (CRNN and YOLOv8n on 400 samples
# trained 65 steps at the default 3e-3, and came out worse than the reconstructed model they started from)
LR_PROBE_MIN_TOTAL = 2 * LR_PROBE_MIN_STEPS  # shorter runs keep the default
LR_PROBE_SAMPLES = 1024  # training samples that judge the probe when no validation data is given


@dataclass
class FinetuneResult:
    """model: the input graph with trained weights (None on ranks other than 0 under torchrun);
    history: one dict per epoch (epoch 0 = before training); best_epoch: the epoch whose weights
    `model` holds."""

    model: onnx.ModelProto | None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metric: str | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    state: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float = 0.0  # the peak learning rate trained with
    lr_probe: list[dict] = field(default_factory=list)  # {"lr", score key: value} per probed rate
    augmentation: str | None = None  # how the training views were made, None: the samples as given
    skipped: str | None = None  # why no epoch was trained (the model is returned as it came)

    def metric_at(self, epoch: int) -> float | None:
        for row in self.history:
            if row["epoch"] == epoch:
                return row.get(self.metric) if self.metric else None
        return None


def finetune(
    model: model_io.ModelLike,
    train: DataLike,
    *,
    val: DataLike | None = None,
    teacher: model_io.ModelLike | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    freeze_bn: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    temperature: float = 1.0,
    distill: str = "auto",
    keep: str = "best",
    clip_grad_norm: float | None = 1.0,
    optimizer: str = DEFAULT_OPTIMIZER,
    warmup: float = DEFAULT_WARMUP,
    augment: str = "auto",
) -> FinetuneResult:
    """Fine-tune `model` on `train` and return it with the trained weights written back.

    train / val: a path (.npz or image folder, via onnx_cp.data.open_dataset), a Dataset, an
    (x, y) pair of arrays (y may be None) or an x array.
    teacher: the model to distil from (e.g. the model before CP decomposition). With labels and a
    teacher the loss is distillation + cross-entropy; without a teacher, labels are required.
    distill: "auto" (the default): every float output of the teacher is a target, with a loss
    by its kind (runtime.fidelity.output_kind), the mean over outputs: class scores (N, C) and
    sequences (N, T, C) / (T, N, C) by KL over the class axis (logits softened by `temperature`;
    softmax outputs as probabilities, log-softmax ones as log-probabilities); detector heads
    (N, 4 + K, A) by the MSE of the box rows and of the class-score rows, each divided by the
    teacher's mean square of that group, summed (so scores count as much as boxes in pixels);
    maps and other outputs by the MSE per channel (axis 1) divided by the teacher's mean square of
    that channel. The normalisers come from the teacher's outputs on the training data, once.
    "kl" / "mse": the old losses, the first output only (KL of softened logits, plain MSE); the
    other outputs are still validated.
    Without labels, validation minimises the worst channel-group error of any output
    (runtime.fidelity.compare_output; KL-distilled logits as their softmax) and reports the top-1
    agreement of class-score outputs (val_agreement).
    A model whose input has a fixed batch size (an exported CRNN often takes 1) runs in chunks of
    it, the teacher too; a training step accumulates the gradients of batch_size samples.
    optimizer: "adamw" (the default, torch.optim.AdamW; `momentum` unused) or "sgd" (momentum);
    lr: the peak learning rate (None: chosen by a probe of LR_PROBE_SHARE of the steps, at least
    LR_PROBE_MIN_STEPS, at each of the optimizer's DEFAULT_LR (0.003 AdamW, 0.001 SGD) times
    LR_PROBE_FACTORS (and lower while the lowest wins, see LR_PROBE_EXTRA), judged on the
    validation data, else on the first training samples; runs under
    LR_PROBE_MIN_TOTAL steps take the default); warmup: the share of the steps over which the
    learning rate rises linearly before the schedule (default 5%).
    epochs / steps: training length (steps wins if both are given; default 5 epochs).
    keep: "best" (best validation epoch, when validation data is given) or "last".
    clip_grad_norm: scale gradients down to this global norm when above it (a guard against the
    blow-ups of multiplicative CP chains at high learning rates).
    freeze_bn: BatchNorm running statistics stay as they are (the default: fine-tuning batches are
    small and often unlabelled); its scale and shift are trained either way.
    """
    started = time.perf_counter()
    probe_lr = lr is None
    lr = DEFAULT_LR.get(optimizer, 0.001) if lr is None else lr
    _check_options(epochs, steps, lr, batch_size, schedule, distill, keep, temperature)
    if resume and not (checkpoint and Path(checkpoint).exists()):
        missing = f"{checkpoint} does not exist" if checkpoint else "no checkpoint given"
        raise UsageError(f"nothing to resume: {missing}", option="resume")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if not 0 <= warmup < 1:
        raise UsageError(f"warmup is a share of the training steps in [0, 1), got {warmup}")
    source = model_io.to_ir(model)
    input_name = _single_input(source)
    world = distributed.setup()
    if not world.is_main:
        progress.set_quiet(True)  # one set of progress bars, from rank 0
    try:
        data = _prepare_data(source, input_name, train, val, teacher, world)
        views = _Views(data, augmentation_for(augment, data.x_train.shape[1:], teacher is not None), seed)
        module = to_torch(source).to(world.device)
        module.update_bn_stats = not freeze_bn
        fixed = fixed_batch(source, input_name)
        targets = _make_targets(data, module.output_names, distill, temperature, world)

        def make_trainer(peak: float, label: str = "fine-tuning") -> _Trainer:
            return _Trainer(
                module=module, world=world, lr=peak, momentum=momentum, weight_decay=weight_decay,
                schedule=schedule, batch_size=batch_size, seed=seed, temperature=temperature,
                targets=targets, micro_batch=fixed, clip_grad_norm=clip_grad_norm,
                optimizer=optimizer, warmup=warmup, label=label,
            )

        steps_per_epoch = max(1, math.ceil(len(data.train_idx) / batch_size))
        total_steps = steps if steps else (epochs or DEFAULT_EPOCHS) * steps_per_epoch
        validation = _Validation(data.x_val, data.y_val, data.val_idx, data.teacher_val, targets,
                                 fixed, world)
        fresh = not (resume and checkpoint and Path(checkpoint).exists())
        trials: list[dict] = []
        probed = None  # the best probe's score, on the validation data
        if fresh and probe_lr and total_steps >= LR_PROBE_MIN_TOTAL:
            lr, trials, probed = _probe_lr(make_trainer, module, data, views, validation, lr, total_steps,
                                           steps_per_epoch)
        trainer = make_trainer(lr)
        trainer.configure(total_steps, steps_per_epoch)
        if fresh:
            trainer.record(0, validation.run(module), train_loss=None, seconds=0.0, samples=0)
        else:
            trainer.load(checkpoint)
        skipped = _not_worth_training(probed, trainer, keep)
        if not skipped:
            trainer.fit(views, validation, checkpoint)
        state = trainer.final_state(keep)
        result = FinetuneResult(
            model=None, history=trainer.history, best_epoch=trainer.kept_epoch(keep),
            metric=validation.metric, samples_per_second=trainer.samples_per_second(),
            state=state, lr=lr, lr_probe=trials,
            augmentation=views.augmentation.describe() if views.augmentation else None, skipped=skipped,
        )
        if world.is_main:
            # the caller's file or proto, not our IR copy: fields IR does not keep stay as they were
            original = source if isinstance(model, ir.Model) else model
            samples = {input_name: np.ascontiguousarray(data.x_train[:fixed or 2])}  # checked on real inputs
            result.model = write_back(original, state, feeds=samples)
        distributed.barrier(world)
        result.seconds = round(time.perf_counter() - started, 3)
        return result
    finally:
        distributed.teardown(world)


def _probe_lr(make_trainer, module: OnnxModule, data: _Data, views: _Views, validation: _Validation,
              default: float, total_steps: int, steps_per_epoch: int) -> tuple[float, list[dict], float | None]:
    """The peak learning rate, among `default` times LR_PROBE_FACTORS, whose short run (the first
    LR_PROBE_SHARE of the steps, with the same warm-up and decay) scores best, the trials, and that
    best score when it was judged on the validation data (None otherwise); the module is left as it
    was."""
    judge = validation
    if judge.metric is None:  # no validation data: judge on the first training samples
        n = min(LR_PROBE_SAMPLES, len(data.train_idx))
        teacher = [t[:n] for t in data.teacher_train] if data.teacher_train is not None else None
        judge = _Validation(data.x_train, data.y_train, data.train_idx[:n], teacher, validation.targets,
                            validation.micro_batch, validation.world)
    if judge.metric is None:
        return default, [], None
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    probe_steps = min(total_steps, max(LR_PROBE_MIN_STEPS, round(LR_PROBE_SHARE * total_steps)))
    scores, trials = [], []

    def probe(rate: float) -> None:
        module.load_state_dict(initial)
        trainer = make_trainer(rate, f"learning-rate probe {rate:.0e}")
        trainer.configure(probe_steps, steps_per_epoch)
        try:
            trainer.fit(views, judge, None)
            score = trainer.best[0] if trainer.best else -math.inf
        except OnnxCpError:  # the loss diverged: this rate is out
            score = -math.inf
        scores.append(score)
        trials.append({"lr": rate, judge.metric: -score if judge.metric == "val_worst_group_error" else score})

    for factor in LR_PROBE_FACTORS:
        probe(default * factor)
    step = LR_PROBE_FACTORS[-1] / LR_PROBE_FACTORS[-2]
    for _ in range(LR_PROBE_EXTRA):
        if int(np.argmax(scores)) != len(scores) - 1:
            break
        probe(trials[-1]["lr"] * step)
    module.load_state_dict(initial)
    best = int(np.argmax(scores))  # ties keep the larger rate
    return trials[best]["lr"], trials, (scores[best] if judge is validation else None)


def _not_worth_training(probed: float | None, trainer: _Trainer, keep: str) -> str | None:
    """Why training is skipped: every probed rate scored worse on the validation data than the
    model as it came, which keeping the best epoch would return anyway. On ddddocr's CRNN (its
    Gemm solved against the data) five rates all hurt the held-back fidelity, and 5 epochs spent
    260 s to keep epoch 0."""
    if probed is None or keep != "best" or trainer.best is None or probed >= trainer.best[0]:
        return None
    return "every learning rate probed made the validation score worse than the model as it came"


# ------------------------------------------------------------------------------- training
class _Trainer:
    def __init__(self, *, module: OnnxModule, world: distributed.World, lr: float,
                 momentum: float, weight_decay: float, schedule: str, batch_size: int, seed: int,
                 temperature: float, targets: _Targets, micro_batch: int | None = None,
                 clip_grad_norm: float | None = None, optimizer: str = "sgd",
                 warmup: float = 0.0, label: str = "fine-tuning"):
        self.module = module
        self.label = label  # what the progress bars say
        self.world = world
        self.model = distributed.wrap(module, world)
        self.batch_size = batch_size
        self.seed = seed
        self.temperature = temperature
        self.targets = targets
        self.micro_batch = micro_batch  # a model with a fixed batch size runs in chunks of it
        self.schedule = schedule
        self.clip_grad_norm = clip_grad_norm
        params = list(module.params.values())
        if not params:
            raise OnnxCpError("the model has no float weights to fine-tune")
        self.warmup = warmup
        if optimizer == "adamw":
            self.optimizer = _AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            self.optimizer = MomentumSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.history: list[dict] = []
        self.step = 0
        self.epoch = 0
        self.best: tuple[float, int] | None = None  # (metric, epoch)
        self.best_state: dict[str, np.ndarray] | None = None
        self.train_seconds = 0.0
        self.train_samples = 0

    def configure(self, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = math.ceil(total_steps / steps_per_epoch)

    def _lr_factor(self, step: int) -> float:
        warm = int(round(self.warmup * self.total_steps))
        if step < warm:  # linear warm-up, then the schedule over the remaining steps
            return (step + 1) / warm
        progress_ = min((step - warm) / max(self.total_steps - warm, 1), 1.0)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress_))
        if self.schedule == "step":  # /10 at half and at three quarters
            return 1.0 if progress_ < 0.5 else 0.1 if progress_ < 0.75 else 0.01
        return 1.0

    def fit(self, views: _Views, validation, checkpoint) -> None:
        while self.epoch < self.epochs and self.step < self.total_steps:
            self.epoch += 1
            loss, seconds, samples = self._train_epoch(*views.of_epoch(self.epoch))
            self.record(self.epoch, validation.run(self.module), loss, seconds, samples)
            if checkpoint and self.world.is_main:
                self.save(checkpoint)
            distributed.barrier(self.world)

    def _train_epoch(self, x, y, indices, teacher_out) -> tuple[float, float, int]:
        # The order and the dropout masks depend on (seed, epoch) only: resuming is exact.
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(indices))
        torch.manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.world.rank)
        self.module.train()
        batches = range(0, len(order), self.batch_size)
        left = self.total_steps - self.step
        batches = batches[:left]
        total, count, started = 0.0, 0, time.perf_counter()
        desc = f"{self.label} epoch {self.epoch}/{self.epochs}"
        bar = progress.bar(len(batches), desc)
        for start in batches:
            local = order[start:start + self.batch_size]
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # A model with a fixed batch size runs chunk by chunk (the last one padded), the
            # gradients accumulating over the step's samples: the same mean loss as one batch.
            micro = self.micro_batch or len(local)
            for part_start in range(0, len(local), micro):
                part = local[part_start:part_start + micro]
                rows = indices[part]
                outs = _forward(self.model, x[rows], micro if self.micro_batch else None,
                                self.world.device)
                part_loss = self.targets.loss(outs, y, rows, teacher_out, part,
                                              self.temperature).sum() / len(local)
                if not torch.isfinite(part_loss):
                    raise OnnxCpError(f"the loss became {part_loss.item()} at epoch {self.epoch}, "
                                      f"step {self.step + 1}: lower the learning rate (--lr)")
                part_loss.backward()
                loss += float(part_loss.item())
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.optimizer.params, self.clip_grad_norm)
            self.optimizer.step(self._lr_factor(self.step))
            self.step += 1
            total += loss * len(local)
            count += len(local)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.train_samples += count * self.world.size
        self.module.eval()
        return total / max(count, 1), seconds, count * self.world.size

    def record(self, epoch: int, metrics: dict, train_loss: float | None, seconds: float,
               samples: int) -> None:
        row = {"epoch": epoch, "step": self.step, "lr": self.optimizer.lr * self._lr_factor(self.step),
               "train_loss": train_loss, "seconds": round(seconds, 3),
               "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
               **metrics}
        self.history.append(row)
        score = metrics.get("_score")
        row.pop("_score", None)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (score, epoch)
            self.best_state = self.module.onnx_state()

    def kept_epoch(self, keep: str) -> int:
        return self.best[1] if keep == "best" and self.best is not None else self.epoch

    def final_state(self, keep: str) -> dict[str, np.ndarray]:
        if keep == "best" and self.best_state is not None:
            return self.best_state
        return self.module.onnx_state()

    def samples_per_second(self) -> float:
        return round(self.train_samples / self.train_seconds, 1) if self.train_seconds else 0.0

    # -------------------------------------------------------------- checkpoints
    def save(self, path) -> None:
        payload = {
            "format": "onnx-cp finetune checkpoint 1",
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step": self.step,
            "history": self.history, "best": self.best, "best_state": self.best_state,
            "train_seconds": self.train_seconds, "train_samples": self.train_samples,
            "total_steps": self.total_steps,
        }
        with atomic_write(path, "wb") as f:  # a crash never leaves half a checkpoint
            torch.save(payload, f)

    def load(self, path) -> None:
        try:
            payload = torch.load(path, map_location=self.world.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises several types on bad files
            raise OnnxCpError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != "onnx-cp finetune checkpoint 1":
            raise OnnxCpError(f"{path}: not an onnx-cp fine-tuning checkpoint")
        try:
            self.module.load_state_dict(payload["module"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = first_line(exc, 160)
            raise OnnxCpError(f"{path}: the checkpoint is for a different model ({first})") from None
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.history, self.best, self.best_state = payload["history"], payload["best"], payload["best_state"]
        self.train_seconds = payload["train_seconds"]
        self.train_samples = payload["train_samples"]


class MomentumSGD:
    """torch.optim.SGD's update (momentum, L2 weight decay, per-step learning-rate factor); the
    weights match torch.optim.SGD's bit for bit (tests/test_finetune.py).

    Written out because constructing a torch.optim optimizer imports torch._dynamo. Measured with
    torch 2.13.0 CPU on 2 cores, fresh processes: torch.optim.SGD(...) takes 1.2-2.2 s (import
    torch._dynamo alone 1.4-1.5 s, the constructor then 0.5 ms), this class 0.0 s; a 4-step
    `onnx-cp finetune` of a tiny CNN runs 4.3 s as is and 5.0-6.0 s with torch._dynamo loaded. That
    is felt in every CLI call and in each torchrun worker."""

    def __init__(self, params: list[torch.Tensor], *, lr: float, momentum: float,
                 weight_decay: float):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        lr = self.lr * lr_factor
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = d.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        buffers = state["buffers"]
        if len(buffers) != len(self.params) or any(
            b is not None and b.shape != p.shape for b, p in zip(buffers, self.params)
        ):
            raise ValueError("momentum buffers do not match the model's parameters")
        self.buffers = [None if b is None else b.to(p.device) for b, p in zip(buffers, self.params)]


class _AdamW:
    """torch.optim.AdamW behind MomentumSGD's interface (step(lr_factor)). Constructing it imports
    torch._dynamo (1.2-2.2 s per process), acceptable for a fine-tuning run."""

    def __init__(self, params: list[torch.Tensor], *, lr: float, weight_decay: float):
        self.params, self.lr = params, lr
        self.inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, lr_factor: float = 1.0) -> None:
        for group in self.inner.param_groups:
            group["lr"] = self.lr * lr_factor
        self.inner.step()

    def state_dict(self) -> dict:
        return {"adamw": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "adamw" not in state:
            raise ValueError("the checkpoint's optimizer is not AdamW")
        self.inner.load_state_dict(state["adamw"])


# ------------------------------------------------------------------------------- validation
class _Validation:
    """Accuracy on labelled data; without labels, how closely every output follows the teacher's:
    the worst channel-group error of any output (runtime.fidelity.compare_output, every group
    normalised by its own norm, so collapsed class scores beside boxes in pixels show), minimised,
    and the top-1 agreement of class-score outputs."""

    def __init__(self, x, y, indices, teacher_out, targets: _Targets, micro_batch, world):
        self.x, self.y, self.indices, self.teacher_out = x, y, indices, teacher_out
        self.targets, self.micro_batch, self.world = targets, micro_batch, world
        self.metric = None
        if x is not None:
            if y is not None:
                self.metric = "val_accuracy"
            elif teacher_out is not None:
                self.metric = "val_worst_group_error"

    def run(self, module: OnnxModule) -> dict:
        if self.metric is None:
            return {}
        module.eval()
        correct = 0.0
        outputs: list[list[np.ndarray]] = [[] for _ in self.targets.items]
        chunk = self.micro_batch or EVAL_BATCH
        with torch.no_grad():
            for start in range(0, len(self.indices), chunk):
                rows = self.indices[start:start + chunk]
                outs = _forward(module, self.x[rows], self.micro_batch, self.world.device)
                if self.y is not None:
                    scores = self.targets.first_output(outs)[:len(rows)]
                    correct += float((scores.argmax(1).cpu().numpy() == self.y[rows]).sum())
                if self.teacher_out is not None:
                    for k, target in enumerate(self.targets.items):
                        value = target.batch_first(outs)[:len(rows)]
                        outputs[k].append(value.float().cpu().numpy())
        metrics: dict = {}
        if self.y is not None:
            correct, count = distributed.sum_all([correct, float(len(self.indices))], self.world)
            metrics["val_accuracy"] = correct / count
        if self.teacher_out is not None:
            metrics.update(self._fidelity([np.concatenate(o) for o in outputs]))
        score = metrics[self.metric]
        metrics["_score"] = -score if self.metric == "val_worst_group_error" else score
        return metrics

    def _fidelity(self, actual: list[np.ndarray]) -> dict:
        expected = self.teacher_out
        if self.world.distributed:  # every rank compares the whole validation set
            gathered: list = [None] * self.world.size
            torch.distributed.all_gather_object(gathered, (expected, actual))
            expected = [np.concatenate([g[0][k] for g in gathered]) for k in range(len(actual))]
            actual = [np.concatenate([g[1][k] for g in gathered]) for k in range(len(actual))]
        results = [compare_output(t.name, *_comparable(t, e, a))
                   for t, e, a in zip(self.targets.items, expected, actual)]
        metrics: dict = {"val_worst_group_error": max(r.worst_group_error for r in results)}
        top1 = [r.agreement["top1"] for r in results if r.kind == CLASS_SCORES]
        if top1:
            metrics["val_agreement"] = float(np.mean(top1))
        metrics["val_group_errors"] = {r.name: r.group_errors for r in results}
        return metrics


def _comparable(target: _Target, expected: np.ndarray, actual: np.ndarray):
    """Logits distilled by KL are compared as the probabilities KL matches (softmax at the training
    temperature): KL ignores a shift shared by a row's logits (its gradient sums to zero over the
    classes) and lets their scale drift where the probabilities stay, so raw logits would judge
    errors training cannot see (measured on charnet: top-1 agreement 0.71 -> 0.84 while the
    centred logits' error rose 0.70 -> 1.61). Collapsed scores still show: uniform probabilities
    are far from the teacher's."""
    if target.loss == "kl" and target.form == "logits":
        axis, t = target.channel_axis, target.temperature
        return _softmax(expected / t, axis), _softmax(actual / t, axis)
    return expected, actual


def _softmax(a: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# ------------------------------------------------------------------------------- distillation
@dataclass
class _Target:
    """One teacher output to distil: where it is among the model's outputs, its batch axis, its kind
    (runtime.fidelity.output_kind of the batch-first shape) with that kind's loss, and the
    normalisers of the loss, computed once from the teacher's outputs on the training data."""

    name: str
    index: int  # among the graph outputs
    batch_axis: int
    squeeze: bool  # (N, C, 1, 1) class scores count as (N, C)
    kind: str
    channel_axis: int | None  # of the batch-first output
    loss: str  # "kl", "mse" (plain) or "normalised mse"
    form: str = "logits"  # kl: "logits", "probabilities" or "log-probabilities"; detections: "probabilities" when
    # the class-score rows are (compared by binary KL), else "logits" (by MSE)
    scale: torch.Tensor | None = None  # normalised mse: mean squares per channel group
    trained: bool = True  # False: validated only (distill "kl" / "mse" train the first output)
    temperature: float = 1.0  # kl of logits

    def batch_first(self, outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = outs[self.index]
        if self.batch_axis:
            out = out.movedim(self.batch_axis, 0)
        return out.reshape(out.shape[0], out.shape[1]) if self.squeeze else out

    def per_sample(self, out: torch.Tensor, ref: torch.Tensor, temperature: float) -> torch.Tensor:
        n = out.shape[0]
        if self.loss == "mse":
            return ((out - ref) ** 2).reshape(n, -1).mean(1)
        if self.loss == "kl":
            axis = self.channel_axis
            if self.form == "probabilities":
                log_s, log_t, factor = out.clamp_min(PROB_FLOOR).log(), ref.clamp_min(PROB_FLOOR).log(), 1.0
            else:  # logits (softened by the temperature) or log-probabilities
                t = temperature if self.form == "logits" else 1.0
                log_s, log_t, factor = F.log_softmax(out / t, axis), F.log_softmax(ref / t, axis), t * t
            kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(axis)
            return kl.reshape(n, -1).mean(1) * factor  # sequences: the mean over time steps
        if self.kind == DETECTIONS:  # box rows and class-score rows, each by its own scale, summed
            out, ref = out.movedim(self.channel_axis, 1), ref.movedim(self.channel_axis, 1)
            boxes = ((out[:, :BOX_ROWS] - ref[:, :BOX_ROWS]) ** 2).reshape(n, -1).mean(1) / self.scale[0]
            if self.form == "probabilities":
                scores = _binary_kl(out[:, BOX_ROWS:], ref[:, BOX_ROWS:]).reshape(n, -1).mean(1)
            else:
                scores = ((out[:, BOX_ROWS:] - ref[:, BOX_ROWS:]) ** 2).reshape(n, -1).mean(1)
            return boxes + scores / self.scale[1]
        err = (out - ref) ** 2
        if err.dim() == 1:
            return err / self.scale[0]
        per_channel = err.reshape(n, err.shape[1], -1).mean(2)  # channel axis 1
        return (per_channel / self.scale).mean(1)


PROB_FLOOR = 1e-8
BINARY_FLOOR = 1e-6  # 1 - 1e-8 is 1.0 in float32


def _binary_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(teacher || student) of independent (sigmoid) probabilities."""
    s = student.clamp(BINARY_FLOOR, 1 - BINARY_FLOOR)
    t = teacher.clamp(BINARY_FLOOR, 1 - BINARY_FLOOR)
    return t * (t.log() - s.log()) + (1 - t) * (torch.log1p(-t) - torch.log1p(-s))


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, BINARY_FLOOR, 1 - BINARY_FLOOR)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


class _Targets:
    """The training loss: distillation of the teacher's outputs (the mean over outputs of each
    one's loss) plus cross-entropy on the first output when there are labels."""

    def __init__(self, items: list[_Target], first_squeeze: bool, first_batch_axis: int):
        self.items = items
        self.first_squeeze, self.first_batch_axis = first_squeeze, first_batch_axis

    def first_output(self, outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = outs[0]
        if self.first_batch_axis:
            out = out.movedim(self.first_batch_axis, 0)
        if out.dim() > 2 and all(d == 1 for d in out.shape[2:]):
            out = out.reshape(out.shape[0], out.shape[1])
        return out

    def loss(self, outs, y, rows, teacher_out, local, temperature: float) -> torch.Tensor:
        """Per-sample losses, shape (len(rows),)."""
        n = len(rows)
        first = self.first_output(outs)[:n]
        loss = first.new_zeros(n)
        trained = [(t, ref) for t, ref in zip(self.items, teacher_out or []) if t.trained]
        if trained:
            for target, ref in trained:
                value = target.batch_first(outs)[:n]
                ref_rows = torch.from_numpy(ref[local]).to(value.device)
                loss = loss + target.per_sample(value, ref_rows, temperature)
            loss = loss / len(trained)
        if y is not None:
            if first.dim() != 2:
                raise OnnxCpError(f"labels need a model output of shape (N, classes); the output "
                                  f"has shape {tuple(first.shape)}")
            labels = torch.from_numpy(y[rows]).to(first.device)
            if int(labels.max()) >= first.shape[1]:
                raise OnnxCpError(f"label {int(labels.max())} is out of range for "
                                  f"{first.shape[1]} model outputs")
            loss = loss + F.cross_entropy(first, labels, reduction="none")
        return loss


def _make_targets(data: _Data, output_names: list[str], distill: str, temperature: float,
                  world: distributed.World) -> _Targets:
    """distill "auto": every float output of the teacher, each with the loss of its kind; "kl" and
    "mse": the first output only, by KL of softened logits or by plain MSE (the old losses)."""
    first_axis = data.teacher_axes[0] if data.teacher_axes else 0
    if data.teacher_train is None:
        return _Targets([], False, first_axis)
    names = data.teacher_names
    by_name = all(n in output_names for n in names)
    if not by_name and len(names) != len(output_names):
        raise OnnxCpError(f"the teacher has outputs {names}, the model {output_names}: they do "
                          "not correspond")
    items = []
    for k, (name, ref, axis, squeeze) in enumerate(zip(names, data.teacher_train,
                                                       data.teacher_axes, data.teacher_squeeze)):
        index = output_names.index(name) if by_name else data.teacher_indices[k]
        kind, channel_axis = output_kind(ref.shape, ref)
        old_loss = distill in ("kl", "mse") and k == 0  # the first output, by the old losses
        if distill == "mse" and old_loss:
            loss = "mse"
        elif (distill == "kl" and old_loss) or kind in (CLASS_SCORES, SEQUENCE):
            loss = "kl"
        else:
            loss = "normalised mse"
        if loss == "kl" and channel_axis is None:
            channel_axis = ref.ndim - 1
        target = _Target(name, index, axis, squeeze, kind, channel_axis, loss, temperature=temperature)
        if loss == "kl":
            target.form = _score_form(ref, channel_axis)
        elif loss == "normalised mse":
            if kind == DETECTIONS and _are_probabilities(np.moveaxis(ref, channel_axis, 1)[:, BOX_ROWS:]):
                target.form = "probabilities"
            target.scale = _mean_squares(ref, kind, channel_axis, world, target.form).to(world.device)
        target.trained = distill == "auto" or old_loss
        items.append(target)
    return _Targets(items, data.teacher_squeeze[0], first_axis)


def _score_form(ref: np.ndarray, axis: int) -> str:
    """Softmax outputs are probabilities, log-softmax outputs log-probabilities, others logits."""
    if ref.size == 0:
        return "logits"
    if ref.min() >= 0 and np.allclose(ref.sum(axis), 1.0, atol=1e-3):
        return "probabilities"
    if ref.max() <= 0 and np.allclose(np.exp(ref.astype(np.float64)).sum(axis), 1.0, atol=1e-3):
        return "log-probabilities"
    return "logits"


def _are_probabilities(scores: np.ndarray) -> bool:
    return scores.size > 0 and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


def _mean_squares(ref: np.ndarray, kind: str, axis: int | None,
                  world: distributed.World, form: str = "logits") -> torch.Tensor:
    """The normalisers of the loss over the training data: per channel group, the teacher's mean
    square: detections (box rows, class-score rows), other outputs per channel of axis 1; a
    near-silent group is judged against a small share of the mean (as runtime.fidelity's channel
    floor). Class-score rows that are probabilities are compared by binary KL, normalised by the
    teacher's mean binary entropy (a student whose scores collapse to 0 pays for every confident
    detection, where by MSE it lost only the scores' small mean square: YOLOv8n at 3e-4 went there)."""
    a = ref.astype(np.float64)
    if kind == DETECTIONS:
        a = np.moveaxis(a, axis, 1)
        scores = a[:, BOX_ROWS:]
        score_sum = float(_binary_entropy(scores).sum()) if form == "probabilities" else float((scores ** 2).sum())
        sums = [float((a[:, :BOX_ROWS] ** 2).sum()), float(a[:, :BOX_ROWS].size), score_sum, float(scores.size)]
    elif a.ndim == 1:
        sums = [float((a ** 2).sum()), float(a.size)]
    else:
        per = a.reshape(a.shape[0], a.shape[1], -1)
        sums = [v for c in range(per.shape[1])
                for v in (float((per[:, c] ** 2).sum()), float(per[:, c].size))]
    sums = distributed.sum_all(sums, world)
    ms = np.array([sums[i] / max(sums[i + 1], 1.0) for i in range(0, len(sums), 2)])
    # The floor compares channels in one unit. A detector's two groups are not: against the boxes'
    # pixels (mean square 2e4 on NudeNet's YOLOv8n) its sparse scores' 7e-5 was floored at 0.01, and
    # the scores weighed 150x less than the boxes, so distillation let them collapse.
    floor = 1e-12 if kind == DETECTIONS else max(CHANNEL_FLOOR ** 2 * float(ms.mean()), 1e-12)
    return torch.tensor(np.maximum(ms, floor), dtype=torch.float32)


def _forward(model, x: np.ndarray, fixed: int | None, device) -> tuple[torch.Tensor, ...]:
    """The model's outputs (a tuple) on x; with a fixed batch size the chunk is padded to it by
    repeating its last sample (callers keep the first len(x) rows)."""
    if fixed and len(x) < fixed:
        x = np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])
    out = model(channels_last(torch.from_numpy(x).to(device)))
    return out if isinstance(out, tuple) else (out,)


# ------------------------------------------------------------------------------- data and models
class _Views:
    """What each epoch trains on: this rank's samples as given, or with an augmentation a fresh
    random view of them per epoch, relabelled by the teacher (seeded by (seed, epoch): resuming is
    exact). The last view is kept: the learning-rate probe trains epoch 1 once per rate."""

    def __init__(self, data: _Data, augmentation: Augmentation | None, seed: int):
        self.data, self.augmentation, self.seed = data, augmentation, seed
        self._last: tuple[int, tuple] | None = None

    def of_epoch(self, epoch: int) -> tuple:
        """(x, y, indices into x and y, the teacher's outputs by position in indices)."""
        data = self.data
        if self.augmentation is None:
            return data.x_train, data.y_train, data.train_idx, data.teacher_train
        if self._last is None or self._last[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])  # ranks hold different samples
            x = augmented(data.x_train[data.train_idx], self.augmentation, rng)
            positions = np.arange(len(x))
            teacher = [r[3] for r in _run_onnx(data.teacher_model, x, positions, f"teacher (views, epoch {epoch})")]
            y = data.y_train[data.train_idx] if data.y_train is not None else None
            self._last = (epoch, (x, y, positions, teacher))
        return self._last[1]


@dataclass
class _Data:
    """Samples in memory, this rank's shard of them, and the teacher's outputs on that shard (every
    float output, batch axis first, (N, C, 1, 1) as (N, C))."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    train_idx: np.ndarray
    teacher_train: list[np.ndarray] | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    val_idx: np.ndarray | None = None
    teacher_val: list[np.ndarray] | None = None
    teacher_names: list[str] = field(default_factory=list)
    teacher_indices: list[int] = field(default_factory=list)  # among the teacher's outputs
    teacher_axes: list[int] = field(default_factory=list)  # batch axis in the graph's layout
    teacher_squeeze: list[bool] = field(default_factory=list)
    teacher_model: ir.Model | None = None


def _prepare_data(source: ir.Model, input_name: str, train, val, teacher,
                  world: distributed.World) -> _Data:
    x_train, y_train = load_samples(train, "training data")
    _check_sample_shape(source, input_name, x_train.shape[1:])
    if teacher is None and y_train is None:
        raise UsageError("the training data has no labels: give a teacher model to distil "
                         "from (--teacher ORIGINAL.onnx)")
    data = _Data(x_train, y_train, distributed.shard(len(x_train), world))
    if val is not None:
        data.x_val, data.y_val = load_samples(val, "validation data")
        _check_sample_shape(source, input_name, data.x_val.shape[1:])
        data.val_idx = distributed.shard(len(data.x_val), world)
    if teacher is not None:
        teacher_model = data.teacher_model = model_io.to_ir(teacher)
        run = _run_onnx(teacher_model, x_train, data.train_idx, "teacher (training data)")
        data.teacher_names = [r[0] for r in run]
        data.teacher_indices = [r[1] for r in run]
        data.teacher_axes = [r[2] for r in run]
        data.teacher_train = [r[3] for r in run]
        data.teacher_squeeze = [r[4] for r in run]
        if data.x_val is not None:
            run = _run_onnx(teacher_model, data.x_val, data.val_idx, "teacher (validation data)")
            data.teacher_val = [r[3] for r in run]
    return data


def load_samples(data: DataLike, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Training needs shuffled mini-batches: load the samples into memory."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise UsageError(f"{what}: expected an (x, y) pair of arrays")
        x, y = data
    elif isinstance(data, np.ndarray):
        x, y = data, None
    else:
        if isinstance(data, (str, os.PathLike)):
            from onnx_cp.data.datasets import open_dataset

            data = open_dataset(data)
        if not hasattr(data, "batches"):
            raise UsageError(f"{what}: expected a path, a Dataset or (x, y) arrays")
        xs, ys = [], []
        for xb, yb in progress.progress(data.batches(EVAL_BATCH), desc=f"loading {what}",
                                        total=math.ceil(len(data) / EVAL_BATCH)):
            xs.append(xb)
            ys.append(yb)
        if not xs:
            raise OnnxCpError(f"{what}: no samples")
        x = np.concatenate(xs)
        y = np.concatenate(ys) if all(v is not None for v in ys) else None
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim < 2 or len(x) == 0:
        raise OnnxCpError(f"{what}: expected samples of shape (N, C, H, W), got {x.shape}")
    if y is not None:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),) or (y < 0).any():
            raise OnnxCpError(f"{what}: labels must be {len(x)} non-negative integers")
        y = y.astype(np.int64)
    return x, y


def _single_input(model: ir.Model) -> str:
    name = single_input(model, "fine-tuning")
    if not model.graph.outputs:
        raise OnnxCpError("the model has no outputs")
    return name


def _check_sample_shape(model: ir.Model, input_name: str, sample_shape) -> None:
    value = next(v for v in model.graph.inputs if v.name == input_name)
    if value.shape is None:
        return
    dims = list(value.shape)[1:]
    if len(dims) != len(sample_shape) or any(
        isinstance(d, int) and d != s for d, s in zip(dims, sample_shape)
    ):
        expected = ["N"] + [d if isinstance(d, int) else str(d) for d in dims]
        raise OnnxCpError(f"data samples have shape {tuple(sample_shape)}, but model input "
                          f"{input_name!r} expects {expected}")


def _run_onnx(model: ir.Model, x: np.ndarray, indices: np.ndarray,
              what: str) -> list[tuple[str, int, int, np.ndarray, bool]]:
    """Every float output of `model` on x[indices], run by onnxruntime (faster than the
    interpreter, and the teacher never needs gradients): (name, index among the outputs, batch
    axis, the values batch axis first, whether (N, C, 1, 1) was squeezed to (N, C)). A model with
    a fixed batch size runs in chunks of it, the last one padded."""
    name = next(v.name for v in model.graph.inputs if v.name not in model.graph.initializers)
    fixed = fixed_batch(model, name)
    chunk = fixed or EVAL_BATCH
    parts: list[list[np.ndarray]] = []
    axes: list[int | None] = []
    try:
        with ort_session(model, threads=max(1, torch.get_num_threads())) as session:
            names = [o.name for o in session.get_outputs()]
            parts = [[] for _ in names]
            axes = [None] * len(names)
            for start in progress.progress(range(0, len(indices), chunk), desc=what,
                                           total=math.ceil(len(indices) / chunk)):
                xb = x[indices[start:start + chunk]]
                n = len(xb)
                if fixed and n < fixed:
                    xb = np.concatenate([xb, np.repeat(xb[-1:], fixed - n, axis=0)])
                for k, out in enumerate(session.run(None, {name: xb})):
                    out = np.asarray(out)
                    if not np.issubdtype(out.dtype, np.floating):
                        continue
                    if axes[k] is None:
                        axes[k] = _batch_axis(out.shape, len(xb))
                    if axes[k] is None:
                        continue
                    parts[k].append(np.moveaxis(out, axes[k], 0)[:n])
    except OnnxCpError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        first = first_line(exc, 200)
        raise OnnxCpError(f"onnxruntime cannot run the {what}: {first}") from None
    result = []
    for k, (out_name, values) in enumerate(zip(names, parts)):
        if not values:
            continue
        out = np.concatenate(values).astype(np.float32)
        squeeze = out.ndim > 2 and all(d == 1 for d in out.shape[2:])
        if squeeze:
            out = out.reshape(out.shape[0], out.shape[1])
        result.append((out_name, k, axes[k], np.ascontiguousarray(out), squeeze))
    if not result:
        raise OnnxCpError(f"the {what} gives no float output with a batch axis to distil")
    return result


def _batch_axis(shape, batch: int) -> int | None:
    """The batch axis of an output: the first (or, for (T, N, C) sequences, the second) whose size
    is the batch's; None for outputs without one."""
    for axis in range(min(len(shape), 2)):
        if shape[axis] == batch:
            return axis
    return None


def _check_options(epochs, steps, lr, batch_size, schedule, distill, keep, temperature) -> None:
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if not lr > 0:
        raise UsageError(f"learning rate must be positive, got {lr}")
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if distill not in ("auto", "kl", "mse"):
        raise UsageError(f"distill {distill!r}: expected auto, kl or mse")
    if keep not in ("best", "last"):
        raise UsageError(f"keep {keep!r}: expected best or last")
    if not temperature > 0:
        raise UsageError(f"temperature must be positive, got {temperature}")


__all__ = ["FinetuneResult", "MomentumSGD", "finetune"]
