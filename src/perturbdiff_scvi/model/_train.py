"""Training helpers of ``PerturbDiff.train``: argument checks, the trainer schedule, and Ctrl+C recovery."""

from __future__ import annotations

import contextlib
import math
import signal
import warnings

import torch
from scvi import settings

from .._validation import is_finite_number, positive_int
from ._presets import DEFAULT_MAX_STEPS


def checked_lengths(max_epochs, max_steps, sets_per_batch, lr) -> tuple[int | None, int | None, int, float]:
    """``train``'s run length, sets per step and learning rate, checked (``DEFAULT_MAX_STEPS`` if no length)."""
    if max_epochs is None and max_steps is None:
        max_steps = DEFAULT_MAX_STEPS
    max_epochs = None if max_epochs is None else positive_int(max_epochs, "max_epochs")
    max_steps = None if max_steps is None else positive_int(max_steps, "max_steps")
    sets_per_batch = positive_int(sets_per_batch, "sets_per_batch")
    if not is_finite_number(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}.")
    return max_epochs, max_steps, sets_per_batch, float(lr)


def schedule_trainer(
    steps_per_epoch: int, max_epochs: int | None, max_steps: int | None, has_val: bool, check_val_every_n_epoch, kwargs
) -> int:
    """Fill the Lightning trainer options in ``kwargs``; return ``max_epochs``.

    A finite epoch count keeps the progress bar readable ("Epoch 12/375"); validation runs about every 50 steps.
    """
    # Steps are optimiser steps: with gradient accumulation an epoch holds fewer of them than batches.
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    if max_epochs is None:
        max_epochs = math.ceil(max_steps * accumulate / steps_per_epoch)
    if check_val_every_n_epoch is None and has_val:
        check_val_every_n_epoch = max(1, math.ceil(50 * accumulate / steps_per_epoch))
    if check_val_every_n_epoch is not None:
        kwargs["check_val_every_n_epoch"] = check_val_every_n_epoch
    kwargs.setdefault("early_stopping_monitor", "validation_loss")
    kwargs.setdefault("gradient_clip_val", 1.0)
    kwargs.setdefault("log_every_n_steps", max(1, min(50, steps_per_epoch)))
    return max_epochs


def run_interruptible(model, runner):
    """Run ``runner()``; after Ctrl+C leave a usable model instead of an exception.

    Lightning turns Ctrl+C into ``sys.exit(1)`` and ignores further Ctrl+C; both are undone, the model keeps the
    weights of the last completed step, is put in eval mode and keeps its history.
    """
    # A trained model is left in eval mode and Lightning keeps module modes as found: switch back, or
    # further training would skip self-conditioning.
    model.module.train()
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        return runner()
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and not runner.trainer.interrupted:
            raise
        _after_interrupt(model, runner, sigint_handler)


def _after_interrupt(model, runner, sigint_handler) -> None:
    try:
        signal.signal(signal.SIGINT, sigint_handler)
    except ValueError:  # not the main thread: nothing was changed there
        pass
    steps = int(runner.trainer.global_step)
    model.module.eval()
    model.is_trained_ = model.is_trained_ or steps > 0
    splitter = runner.data_splitter
    model.train_indices, model.validation_indices = splitter.train_idx, splitter.val_idx
    model.test_indices = splitter.test_idx
    warnings.warn(
        f"Training interrupted after {steps} optimisation steps; the model keeps the weights of the last completed "
        "step and can predict, be saved or be trained further.",
        UserWarning,
        stacklevel=settings.warnings_stacklevel,
    )


def checked_compile(compile: bool, compile_kwargs: dict | None) -> tuple[bool, dict]:
    """``train``'s ``compile`` (a bool) and ``compile_kwargs`` (a dict, only with ``compile=True``), checked."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False; got {compile!r}.")
    if compile_kwargs is not None and not isinstance(compile_kwargs, dict):
        raise ValueError(f"compile_kwargs must be a dict of torch.compile options; got {compile_kwargs!r}.")
    if compile_kwargs and not compile:
        raise ValueError("compile_kwargs was given with compile=False; pass compile=True to compile the denoiser.")
    return compile, dict(compile_kwargs or {})


class CompiledForward:
    """``torch.compile`` of a module's own ``forward``, built at the first call and dropped when pickled.

    Set as the module's ``forward`` instance attribute. Pickling it (``strategy="ddp_spawn"`` pickles the model to
    start the processes) keeps only the module and the options, so each process compiles its own copy.
    """

    def __init__(self, module: torch.nn.Module, compile_kwargs: dict):
        self.module = module
        self.compile_kwargs = compile_kwargs
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(type(self.module).forward.__get__(self.module), **self.compile_kwargs)
        return self._compiled(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {"module": self.module, "compile_kwargs": self.compile_kwargs, "_compiled": None}


@contextlib.contextmanager
def compiled_denoiser(module, enabled: bool, compile_kwargs: dict | None):
    """Run the block with ``module.denoiser.forward`` compiled by :func:`torch.compile` (if ``enabled``).

    Only the denoiser's ``forward`` is replaced, by an instance attribute (:class:`CompiledForward`): module names,
    parameter names and the ``state_dict`` keys stay those of the eager model (``torch.compile(module)`` would
    prefix them with ``_orig_mod.``), the noising, self-conditioning coin and loss stay eager, and the EMA copy used
    for sampling is not compiled. The eager ``forward`` is restored on exit, also after an error or Ctrl+C, so
    nothing compiled reaches ``save`` or prediction.
    """
    if not enabled:
        yield
        return
    denoiser = module.denoiser
    if "forward" in vars(denoiser):
        raise RuntimeError("module.denoiser.forward is already replaced; train(compile=True) cannot compile it.")
    denoiser.forward = CompiledForward(denoiser, dict(compile_kwargs or {}))
    try:
        yield
    finally:
        del denoiser.forward
