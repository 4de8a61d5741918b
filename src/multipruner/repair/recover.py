"""LoRA recovery fine-tuning of a pruned model (peft), resumable, merged into the weights at the end.

Defaults follow the reference (r 16, alpha 32, every linear projection, lr 1e-4); the step count is sized
for a CPU (minutes on SmolLM2-135M), raise ``--max-steps`` where there is a GPU. Training text is a
calibration source (by default the same mix the search uses, drawn with another seed) cut into sequences;
the loss is the causal-LM loss on every token.

Checkpoints (adapter, optimizer, scheduler, step) go to ``<output>.checkpoints/step-N`` every
``save_every`` steps; ``resume`` continues from the newest. At the end the adapter is merged into the
pruned weights, so the result loads exactly like any pruned model, without peft; the adapter itself is
kept in ``<output>/adapter``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..faults import crash_point
from ..io_utils import atomic_directory, atomic_write_text, check_output
from ..search.calibration import DEFAULT_SOURCE, draw_tokens
from ..settings import setting

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class RecoveryError(UsageError):
    """Recovery cannot run as asked."""


@dataclass(frozen=True)
class RecoverSettings:
    data: str = setting(DEFAULT_SOURCE, help="training text: a calibration source name, path or '+' mix")
    max_steps: int = setting(
        60, help="optimizer steps (a CPU default; the reference trains 2 epochs of Alpaca)"
    )
    batch_size: int = setting(2, help="sequences per step")
    seqlen: int = setting(512, help="tokens per sequence")
    lr: float = setting(1e-4, help="peak learning rate (linear warm-up, then linear decay)")
    warmup_steps: int = setting(5, help="linear warm-up steps")
    r: int = setting(16, help="LoRA rank")
    alpha: int = setting(32, help="LoRA alpha")
    dropout: float = setting(0.05, help="LoRA dropout")
    targets: list[str] = setting(
        help="modules to adapt (default: every linear projection of the family)", default_factory=list
    )
    save_every: int = setting(20, help="checkpoint every N steps")
    seed: int = setting(1234, help="seed of the data draw and of the adapter initialisation")

    def validate(self) -> None:
        positive = {
            k: v
            for k, v in self.__dict__.items()
            if k in ("max_steps", "batch_size", "seqlen", "r", "save_every")
        }
        bad = [f"--{k.replace('_', '-')} must be at least 1, got {v}" for k, v in positive.items() if v < 1]
        if self.lr <= 0:
            bad.append(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            bad.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if bad:
            raise RecoveryError("invalid recovery settings: " + "; ".join(bad))


@dataclass
class TrainerState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def default_targets(adapter) -> list[str]:
    return [*adapter.linears("attention"), *adapter.linears("mlp")]


def _check_targets(model, targets: list[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise RecoveryError(
            f"LoRA targets {missing} are not linear modules of this model; it has {', '.join(sorted(present))}"
        )


def checkpoints_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def latest_checkpoint(output: Path) -> Path | None:
    steps = sorted(checkpoints_dir(output).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None


def training_tokens(settings: RecoverSettings, tokenizer) -> torch.Tensor:
    budget = settings.max_steps * settings.batch_size * settings.seqlen
    return draw_tokens(settings.data, tokenizer, tokens=budget, seqlen=settings.seqlen, seed=settings.seed)


class Recovery:
    """One LoRA fine-tuning of ``model`` (a pruned model, trained in place through peft)."""

    def __init__(self, model, tokenizer, settings: RecoverSettings, output: Path, progress: bool = True):
        from peft import LoraConfig, get_peft_model

        from ..core.adapters import adapter_for

        settings.validate()
        self.settings, self.output, self.progress, self.tokenizer = (
            settings,
            Path(output),
            progress,
            tokenizer,
        )
        targets = settings.targets or default_targets(adapter_for(model))
        _check_targets(model, targets)
        torch.manual_seed(settings.seed)
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, config)
        self.optimizer = torch.optim.AdamW(
            (p for p in self.model.parameters() if p.requires_grad), lr=settings.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = TrainerState()

    def _lr_factor(self, step: int) -> float:
        s = self.settings
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        return max(0.0, (s.max_steps - step) / max(1, s.max_steps - s.warmup_steps))

    # --- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        target = checkpoints_dir(self.output) / f"step-{self.state.step}"
        with atomic_directory(target, overwrite=True) as tmp:
            self.model.save_pretrained(tmp)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                tmp / "optim.pt",
            )
            atomic_write_text(tmp / STATE_FILE, json.dumps(self.state.__dict__))
        for old in checkpoints_dir(self.output).glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(path / "adapter_model.safetensors"))
        optim = torch.load(path / "optim.pt", weights_only=True)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        self.state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        log.info("resuming recovery from %s (step %d)", path, self.state.step)

    # --- training --------------------------------------------------------------------------
    def train(self, tokens: torch.Tensor) -> TrainerState:
        s = self.settings
        device = next(self.model.parameters()).device
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(s.seed))
        self.model.train()
        with tqdm(
            total=s.max_steps, initial=self.state.step, desc="recover", disable=not self.progress
        ) as bar:
            while self.state.step < s.max_steps:
                start = (self.state.step * s.batch_size) % tokens.shape[0]
                rows = order[start : start + s.batch_size]
                batch = tokens[rows].to(device)
                loss = self.model(input_ids=batch, labels=batch).loss
                if not math.isfinite(loss.item()):
                    raise RecoveryError(
                        f"the training loss became {loss.item()} at step {self.state.step}; lower --lr"
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                self.state.losses.append(round(loss.item(), 5))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                crash_point("recover_step")
                if self.state.step % s.save_every == 0 and self.state.step < s.max_steps:
                    self.save_checkpoint()
        self.model.eval()
        return self.state

    def merged(self):
        """The pruned model with the adapter folded into its weights (peft no longer needed)."""
        return self.model.merge_and_unload()


def recover(
    pruned_dir: str | Path,
    output: str | Path,
    settings: RecoverSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dtype=torch.float32,
    device="cpu",
    progress: bool = True,
) -> dict:
    """Fine-tune the pruned model in ``pruned_dir`` with LoRA and save the merged result to ``output``."""
    from ..core.checkpoint import PLAN_FILENAME, load_pruned, save_pruned
    from ..core.layout import ModelLayout
    from ..core.plan import PruningPlan

    output = Path(output)
    settings.validate()
    check_output(output, directory=True, overwrite=overwrite)
    checkpoint = latest_checkpoint(output) if resume else None
    if not resume and checkpoints_dir(output).exists():
        shutil.rmtree(checkpoints_dir(output))
    model, tokenizer = load_pruned(pruned_dir, dtype=dtype, device=device)
    if tokenizer is None:
        raise RecoveryError(f"{pruned_dir} has no tokenizer; recovery needs one to cut its training text")
    run = Recovery(model, tokenizer, settings, output, progress=progress)
    if checkpoint is not None:
        run.load_checkpoint(checkpoint)
    tokens = training_tokens(settings, tokenizer)
    state = run.train(tokens)
    plan_data = json.loads((Path(pruned_dir) / PLAN_FILENAME).read_text())
    layout = ModelLayout.from_dict(plan_data["layout"])
    plan = PruningPlan.from_dict(plan_data, layout)
    summary = {
        "settings": {k: v for k, v in settings.__dict__.items()},
        "steps": state.step,
        "first_loss": state.losses[0] if state.losses else None,
        "last_loss": sum(state.losses[-5:]) / len(state.losses[-5:]) if state.losses else None,
        "from": str(pruned_dir),
    }
    plan = replace(plan, meta={**plan.meta, "recovery": summary})
    adapter_tmp = checkpoints_dir(output) / "final-adapter"
    run.model.save_pretrained(adapter_tmp)
    merged = run.merged()
    save_pruned(merged, tokenizer, output, plan, layout, overwrite=True)
    shutil.move(str(adapter_tmp), str(output / "adapter"))
    shutil.rmtree(checkpoints_dir(output), ignore_errors=True)
    return summary
