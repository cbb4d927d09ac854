"""The training step: value_and_grad over the trainable set, accumulation, clipping, AdamW, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import loss as L
from .config import ModelConfig
from .model import LlamaForCausalLM
from .precision import model_dtype
from .schedule import make_schedule
from .settings import SettingsError, TrainSettings
from .weights import LoadReport, WeightLoadError, load_weights

CHECKPOINT_FORMAT = "mlx-parity-checkpoint/1"


def to_mx_batch(batch: dict[str, np.ndarray]) -> dict[str, mx.array]:
    L.validate_batch(batch)
    return {
        "input_ids": mx.array(np.asarray(batch["input_ids"], dtype=np.int32)),
        "attention_mask": mx.array(np.asarray(batch["attention_mask"], dtype=np.int32)),
        "auth_weight": mx.array(np.asarray(batch["auth_weight"], dtype=np.float32)),
        "prov_entropy": mx.array(np.asarray(batch["prov_entropy"], dtype=np.float32)),
    }


def split_batch(batch: dict[str, np.ndarray], parts: int, what: str = "accum_steps") -> list[dict[str, np.ndarray]]:
    """Micro-batches for accumulation (or the ranks' shards of one): the batch cut in order into `parts` equal
    slices."""
    B = len(batch["input_ids"])
    if B % parts:
        raise SettingsError(f"batch size {B} is not divisible by {what}={parts}")
    n = B // parts
    return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(parts)]


class Trainer:
    """A model, its trainable set and its optimizer; one `step` is one optimizer update."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        settings: TrainSettings,
        lora_init: dict[str, mx.array] | None = None,
        group: mx.distributed.Group | None = None,
    ):
        """`group`: the ranks this trainer is one of (`mx.distributed.init()`, started by `mlx.launch`): each
        update then takes this rank's contiguous share of every micro-batch and averages the gradients and
        losses over the ranks (docs/training-step.md, data parallelism). None: one process."""
        self.model, self.settings = model, settings
        self.group = group if group is not None and group.size() > 1 else None
        self.dtype = model_dtype(settings.precision)
        if self.dtype != mx.float32:  # before the adapters, which stay float32
            model.set_dtype(self.dtype)
        self.adapter_names: list[str] = []
        if settings.trainable == "lora":
            self.adapter_names = model.add_lora(settings.lora.layers, settings.lora.rank, settings.lora.scale)
            if lora_init is not None:
                self._load_adapters(lora_init)
        elif lora_init is not None:
            raise SettingsError("lora_init given but trainable is not 'lora'")
        self._select_trainable()
        o = settings.optimizer
        self.optimizer = optim.AdamW(
            learning_rate=make_schedule(o, settings.schedule),
            betas=list(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            bias_correction=o.bias_correction,
        )
        self._value_and_grad = nn.value_and_grad(model, self._loss)
        mx.eval(model.parameters())

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path, settings: TrainSettings, lora_init=None, strict: bool = True, group=None
    ):
        """A trainer on a Hugging Face checkpoint folder; returns (trainer, load report)."""
        cfg = ModelConfig.from_file(checkpoint)
        model = LlamaForCausalLM(cfg)
        report = load_weights(model, checkpoint, strict=strict)
        if isinstance(lora_init, (str, Path)):
            lora_init = mx.load(str(lora_init))
        return cls(model, settings, lora_init, group), report

    def _load_adapters(self, tensors: dict[str, mx.array]) -> None:
        params = dict(tree_flatten(self.model.parameters()))
        missing = sorted(set(self.adapter_names) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.adapter_names))
        mismatched = [k for k in set(tensors) & set(self.adapter_names) if tensors[k].shape != params[k].shape]
        if missing or unexpected or mismatched:
            report = LoadReport(missing=missing, unexpected=unexpected, mismatched=sorted(mismatched))
            raise WeightLoadError(report, Path("lora_init"))
        self.model.update(tree_unflatten([(k, tensors[k]) for k in self.adapter_names]))

    def _select_trainable(self) -> None:
        m, kind = self.model, self.settings.trainable
        if kind == "full":
            m.unfreeze()
            return
        m.freeze()
        if kind == "head":
            (m.model.embed_tokens if m.config.tie_word_embeddings else m.lm_head).unfreeze()
            m.model.norm.unfreeze()
        else:  # lora
            m.unfreeze(recurse=True, keys=["lora_a", "lora_b"], strict=False)

    def trainable_names(self) -> list[str]:
        return sorted(k for k, _ in tree_flatten(self.model.trainable_parameters()))

    # --- numerics -------------------------------------------------------------------------
    def _loss(self, batch):
        return self._loss_from_logits(self.model(batch["input_ids"]), batch)

    def _loss_from_logits(self, logits, batch):
        parts = L.loss_parts(logits.astype(mx.float32), batch, self.settings.loss)
        return parts["total"], parts["ce"], parts["distrust"]

    def loss_from_logits(self, logits: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """The loss parts of given logits: the loss judged on its own, on the reference's logits."""
        total, ce, d = self._loss_from_logits(mx.array(np.asarray(logits, dtype=np.float32)), to_mx_batch(batch))
        return {"ce": ce.item(), "distrust": d.item(), "total": total.item()}

    def pieces(self, input_ids: np.ndarray, given: dict[str, np.ndarray] | None = None) -> dict[str, mx.array]:
        """The forward pass in pieces: the model's own chain, or each piece from given values of its
        inputs (the forward judged piece by piece, on the reference's values)."""
        ids = mx.array(np.asarray(input_ids, dtype=np.int32))
        out = self.model.pieces(
            ids,
            None
            if given is None
            else {k: mx.array(np.asarray(v, dtype=np.float32)).astype(self.dtype) for k, v in given.items()},
        )
        mx.eval(out)
        return out

    def update_from_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """One update (clip, then AdamW) with given gradients: the optimizer judged on its own."""
        params = self.parameters()  # each gradient in its parameter's dtype
        self.apply(
            self.clip(
                tree_unflatten(
                    [
                        (
                            k,
                            mx.array(np.asarray(v, dtype=np.float32)).astype(
                                params[k].dtype if k in params else mx.float32
                            ),
                        )
                        for k, v in grads.items()
                    ]
                )
            )
        )

    def loss(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        total, ce, d = self._loss(to_mx_batch(batch))
        return {"ce": ce.item(), "distrust": d.item(), "total": total.item()}

    def gradients(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, mx.array]]:
        (total, ce, d), grads = self._value_and_grad(to_mx_batch(batch))
        mx.eval(total, grads)
        return {"ce": ce.item(), "distrust": d.item(), "total": total.item()}, dict(tree_flatten(grads))

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer update on `batch`: accumulate, clip, apply."""
        parts, grads = self.accumulate(batch)
        self.apply(self.clip(grads))
        return parts

    def accumulate(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, float], dict]:
        """Mean loss parts and mean gradients over the `accum_steps` micro-batches, in order; on N ranks over
        this rank's share of each, then over the ranks (all-summed, divided by N)."""
        L.validate_batch(batch)  # the whole batch, before it is cut
        micro = split_batch(batch, self.settings.accum_steps)
        if self.group is not None:
            micro = [self._share(mb) for mb in micro]
        grads, parts = None, []
        for mb in micro:
            (total, ce, d), g = self._value_and_grad(to_mx_batch(mb))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)
            parts.append((total.item(), ce.item(), d.item()))
        n = len(micro)
        if n > 1:
            grads = tree_map(lambda g: g / n, grads)
        if self.group is not None:
            grads = self._all_reduce(grads)
            # every rank's float32 losses, summed here in rank order as one process sums its micro-batches
            every = mx.distributed.all_gather(mx.array(parts, dtype=mx.float32), group=self.group)
            parts, n = [tuple(float(x) for x in row) for row in np.array(every)], n * self.group.size()
            mx.eval(grads)
        sums = {k: sum(p[i] for p in parts) for i, k in enumerate(("total", "ce", "distrust"))}
        return {k: v / n for k, v in sums.items()}, grads

    def _share(self, micro_batch: dict) -> dict:
        """This rank's contiguous part of a micro-batch."""
        return split_batch(micro_batch, self.group.size(), "the world size")[self.group.rank()]

    def _all_reduce(self, grads: dict) -> dict:
        """Every rank's mean gradient, all-summed and divided by the world size: the same values on every rank."""
        world = self.group.size()
        return tree_map(lambda g: mx.distributed.all_sum(g, group=self.group) / world, grads)

    def clip(self, grads: dict) -> dict:
        if self.settings.clip_norm is None:
            return grads
        return optim.clip_grad_norm(grads, self.settings.clip_norm)[0]

    def apply(self, grads: dict) -> None:
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def parameters(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.parameters()))

    def optimizer_state(self) -> dict:
        """`{"step": int, "m": {name: array}, "v": {name: array}}` for the trainable set."""
        flat = dict(tree_flatten(self.optimizer.state))
        names = self.trainable_names()
        return {
            "step": int(self.optimizer.state["step"].item()),
            "m": {n: flat[n + ".m"] for n in names if n + ".m" in flat},
            "v": {n: flat[n + ".v"] for n in names if n + ".v" in flat},
        }

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, metadata: dict | None = None) -> None:
        """Parameters (a Hugging Face-loadable model.safetensors when no adapters), optimizer state,
        config and settings. Written to a temporary folder and renamed, so it is never half written."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp / "model.safetensors"), self.parameters(), metadata={"format": "pt"})
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        (tmp / "config.json").write_text(json.dumps(self.model.config.to_hf_dict(), indent=2))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.settings.to_dict(),
            "step": self.optimizer_state()["step"],
        }
        meta.update(metadata or {})
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a checkpoint")
        tmp.rename(path)

    @classmethod
    def load_checkpoint(cls, path: str | Path) -> Trainer:
        """Rebuild the trainer of a checkpoint; continuing reproduces the uninterrupted run exactly."""
        path = Path(path)
        try:
            meta = json.loads((path / "trainer.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is not a trainer checkpoint (no trainer.json)") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        settings = TrainSettings.from_dict(meta["settings"])
        trainer = cls(LlamaForCausalLM(ModelConfig.from_file(path)), settings)
        saved = mx.load(str(path / "model.safetensors"))
        expected = trainer.parameters()
        report = LoadReport(
            missing=sorted(set(expected) - set(saved)),
            unexpected=sorted(set(saved) - set(expected)),
            mismatched=sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape),
        )
        if not report.ok:
            raise WeightLoadError(report, path)
        trainer.model.update(tree_unflatten(list(saved.items())))
        trainer.optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        mx.eval(trainer.model.parameters(), trainer.optimizer.state)
        return trainer
