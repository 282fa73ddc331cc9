"""One request at a time: the lock an `Engine` takes per call, and the guard that serialises the
forwards of a patched model.

A patched model keeps per-forward state between its pre- and post-forward hooks (the reuse
controller's plan, the cache the attention layers read), and an Engine keeps per-request state
between tokenizing a prompt and its prefill. Interleaving two threads there mixes requests up
(wrong tokens, half-written chunks), so both are serialised: other threads wait their turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from .errors import PatchStateError


class RequestLock:
    """A lock that knows which thread holds it; other threads wait.

    The holding thread entering again is refused with a clear error (`on_reentry="refuse"`: e.g.
    `engine.generate` while the same thread still iterates `engine.stream`) rather than
    deadlocking; with `"keep"` it just keeps the lock (a forward guard: a thread can only be in a
    new top-level forward if its previous one ended without its post-hook, i.e. interrupted).
    """

    def __init__(self, what: str, on_reentry: Literal["refuse", "keep"] = "refuse") -> None:
        self.what = what
        self.on_reentry = on_reentry
        self._condition = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._held_by = ""

    def acquire(self, caller: str = "") -> None:
        me = threading.get_ident()
        with self._condition:
            if self._owner == me:
                if self.on_reentry == "refuse":
                    raise PatchStateError(
                        f"{self.what}.{caller or 'call'} while this thread's {self.what}.{self._held_by} is "
                        f"still running (an unfinished stream?); finish or close it first"
                    )
                return
            while self._owner is not None:
                self._condition.wait()
            self._owner, self._held_by = me, caller or "call"

    def release(self) -> None:
        """Release (by a thread that does not hold the lock: nothing)."""
        with self._condition:
            if self._owner == threading.get_ident():
                self._owner = None
                self._condition.notify()

    @contextmanager
    def held(self, caller: str) -> Iterator[None]:
        self.acquire(caller)
        try:
            yield
        finally:
            self.release()


class ForwardGuard:
    """Hooks that make a model run one top-level forward at a time across threads (`remove()`
    takes them off). Install it after the model's other forward hooks: its pre-hook goes first,
    its post-hook last, and the post-hook also runs when the forward or another hook raises.
    A KeyboardInterrupt skips torch's post-hooks: the interrupted thread then keeps the guard
    until its next forward ends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lock = RequestLock("patched model forward", on_reentry="keep")
        self._pre = model.register_forward_pre_hook(self._enter, prepend=True)
        self._post = model.register_forward_hook(self._leave, always_call=True)

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self.lock.acquire("forward")

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.lock.release()

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

