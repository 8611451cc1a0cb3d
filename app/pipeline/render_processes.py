"""Heavy drawings in processes of their own, outside the service's GIL.

A nice value lowers a thread's share of the CPU, not its share of the GIL: the numpy colour table
and blend, Pillow's calls and base64 of a 4096-px picture hold the one GIL that the event loop,
the decoding and the model passes need too. ``RenderProcesses`` keeps ``CAMSERVE_RENDER_PROCESSES``
spawned, niced processes that draw with the threads' own code (``rendering.Canvas.build`` and
``OUTPUT_KINDS``): the service sends the decoded upload once per image and then each map (a few
floats), and gets each picture's base64 text back.

One drawing holds one process (``ProcessPainter``, a ``rendering.Painter``) from its first
picture to its last. Each picture is one step that a thread of ``threads`` waits for, so a
cancel (the deadline, the drain, a cancelled job) waits for the picture being drawn and no
longer (``draw_maps``). A process that dies fails its drawing with 503 ``render_unavailable``
and ``Retry-After``; the next drawing starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from app.errors import RenderUnavailable, ShuttingDown
from app.models.memory import trim_heap
from app.pipeline.admission import run_to_the_end
from app.pipeline.decoding import Box, DecodedImage
from app.pipeline.rendering import (
    HEAVY_NICENESS,
    OUTPUT_KINDS,
    Canvas,
    MapJob,
    PictureSize,
    RenderStyle,
)

logger = logging.getLogger(__name__)

#: Seconds a process has to end after it is told to, before it is killed.
STOP_WAIT_S = 5.0
_NO_INPUT = torch.empty(0)


@dataclass(frozen=True)
class ProcessCanvas:
    """A canvas that lives in a drawing process: what the answer says about it."""

    size: tuple[int, int]
    region: tuple[int, int, int, int]


# --------------------------------------------------------------------------- the process


def serve(connection: Connection, niceness: int) -> None:
    """A drawing process's loop: answer each message until the service closes the pipe.

    ``("canvas", image, box, original_size, size, crop)`` builds the image's canvas (kept until
    the next one) and answers its size and region; ``("draw", name, cam, normalized, style)``
    answers output kind ``name`` of that map over the canvas, base64; ``("release",)`` drops
    them once the drawing is over. Every answer is ``("ok", value)`` or ``("error", error)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the service's to handle
    with contextlib.suppress(OSError):
        os.nice(niceness)
    torch.set_num_threads(1)
    canvas: Canvas | None = None
    job: MapJob | None = None
    drawn_for: tuple[bytes, bool, RenderStyle] | None = None
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):  # the service closed its end: nothing more to draw
            return
        try:
            if message[0] == "release":
                # The drawing is over: its canvas and pictures go, and the heap pages with them
                # (a 4096-px canvas, its map's images and the encoder's buffers: ~300 MB).
                canvas = job = drawn_for = None
                answer: Any = trim_heap()
            elif message[0] == "canvas":
                _, image, box, original_size, size, crop = message
                decoded = DecodedImage("", image, original_size, _NO_INPUT, box)
                canvas = Canvas.build(decoded, size, crop)
                job = drawn_for = None
                answer = (canvas.picture.size, canvas.region)
            else:
                _, name, cam, normalized, style = message
                # The pictures of one map (overlay and heatmap) share its colour map.
                key = (cam.tobytes(), normalized, style)
                if job is None or drawn_for != key:
                    job = MapJob(torch.from_numpy(cam), normalized, canvas, style)
                    drawn_for = key
                answer = OUTPUT_KINDS[name].render(job)
            reply: tuple[str, Any] = ("ok", answer)
        except Exception as error:  # the service raises it as the thread path would
            reply = ("error", error)
        try:
            connection.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            connection.send(("error", RuntimeError(f"drawing failed: {reply[1]!r}")))
        except (EOFError, OSError):
            return


# --------------------------------------------------------------------------- the service's side


class DrawingProcess:
    """One spawned drawing process and the service's end of its pipe."""

    def __init__(self, context: Any, niceness: int) -> None:
        ours, theirs = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=serve, args=(theirs, niceness), name="camserve-render", daemon=True
        )
        self.process.start()
        theirs.close()  # its death then reads as the end of our pipe
        self.connection: Connection = ours
        self.broken = False

    @property
    def alive(self) -> bool:
        return not self.broken and self.process.is_alive()

    def call(self, message: tuple[Any, ...]) -> Any:
        """Send ``message`` and wait for its answer (blocking: a thread's work)."""
        try:
            self.connection.send(message)
            status, value = self.connection.recv()
        except (EOFError, OSError) as error:
            self.broken = True
            logger.warning(
                "drawing process %s ended (exit code %s) during a drawing",
                self.process.pid,
                self.process.exitcode,
            )
            raise RenderUnavailable(
                "The process drawing this request's pictures ended before it was done. Send the "
                "request again; a new one draws it.",
                headers={"Retry-After": "1"},
            ) from error
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        """End the process (at once: a drawing it was in is lost) and wait for it."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(STOP_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


class ProcessPainter:
    """Draws one request's Pillow pictures in one drawing process (``rendering.Painter``)."""

    def __init__(self, process: DrawingProcess) -> None:
        self._process = process

    def canvas(
        self, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]
    ) -> ProcessCanvas:
        box = Box(decoded.box.left, decoded.box.top, decoded.box.right, decoded.box.bottom)
        picture_size, region = self._process.call(
            ("canvas", decoded.image, box, decoded.original_size, size, crop)
        )
        return ProcessCanvas(tuple(picture_size), tuple(region))

    def render(
        self, name: str, cam: torch.Tensor, normalized: bool, canvas: Any, style: RenderStyle
    ) -> str:
        values = np.ascontiguousarray(cam.detach().cpu().numpy())
        text: str = self._process.call(("draw", name, values, normalized, style))
        return text


class RenderProcesses:
    """Up to ``processes`` drawing processes (spawned when a drawing first needs one, then kept;
    ``niceness`` nicer than the service); a drawing waits for a free one."""

    def __init__(self, processes: int, niceness: int = HEAVY_NICENESS) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes!r}.")
        self.processes = processes
        self.niceness = niceness
        self.threads = ThreadPoolExecutor(
            max_workers=processes, thread_name_prefix="camserve-render-process"
        )
        """Where a drawing waits for its process's answers (one thread per process)."""
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[DrawingProcess] = []
        self._busy: set[DrawingProcess] = set()
        self._free: asyncio.Semaphore | None = None
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The running processes' ids."""
        return [p.process.pid for p in (*self._idle, *self._busy) if p.process.pid is not None]

    @asynccontextmanager
    async def painter(self) -> AsyncIterator[ProcessPainter]:
        """A painter on a process of its own for the block."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.processes)
        async with self._free:
            if self._closed:
                raise ShuttingDown("The service is shutting down; send the request again.")
            # A new process is spawned off the event loop (a fork and an exec).
            process = await run_to_the_end(self.threads, self._take)
            self._busy.add(process)
            try:
                yield ProcessPainter(process)
            finally:
                if process.alive and not self._closed:
                    with contextlib.suppress(RenderUnavailable):
                        await run_to_the_end(self.threads, partial(process.call, ("release",)))
                self._busy.discard(process)
                if process.alive and not self._closed:
                    self._idle.append(process)
                else:
                    process.stop()

    def _take(self) -> DrawingProcess:
        while self._idle:
            process = self._idle.pop()
            if process.alive:
                return process
            process.stop()
        return DrawingProcess(self._context, self.niceness)

    def close(self) -> None:
        """Stop every process (a drawing still in one fails with 503) and the waiting threads."""
        self._closed = True
        for process in (*self._idle, *self._busy):
            process.stop()
        self._idle.clear()
        self.threads.shutdown(wait=True)
