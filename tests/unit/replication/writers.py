"""Guest-like writers for engine tests: threads writing version-stamped blocks, whose
acknowledged writes give the exact image every in-sync member must hold."""

from __future__ import annotations

import random
import threading
import time

from tests.unit.replication.replicas import KIB, SIZE, Engine

BLOCK = 4 * KIB


class Writers:
    """Threads writing version-stamped blocks (each thread its own blocks), with flushes
    and zeroes now and then; ``expected`` is the image every in-sync member must hold."""

    def __init__(self, engine: Engine, threads: int = 3, seed: int = 1) -> None:
        self.engine = engine
        self.base = engine.read(0, SIZE)  # what was there before: the writers overwrite it
        self.threads = threads
        self.blocks = SIZE // BLOCK
        self.seed = seed
        self.written: dict[int, bytes] = {}
        self.errors: list[BaseException] = []
        self.acked = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    def _run(self, tid: int) -> None:
        r = random.Random(self.seed * 100 + tid)
        version = 0
        while not self._stop.is_set():
            block = r.randrange(tid, self.blocks, self.threads)
            version += 1
            if r.random() < 0.1:
                data = bytes(BLOCK)
            else:
                stamp = f"block {block} thread {tid} version {version};".encode()
                data = (stamp * (BLOCK // len(stamp) + 1))[:BLOCK]
            try:
                if data == bytes(BLOCK):
                    self.engine.write_zeroes(block * BLOCK, BLOCK)
                else:
                    self.engine.write(block * BLOCK, data)
                if r.random() < 0.05:
                    self.engine.flush()
            except Exception as err:
                self.errors.append(err)
                return
            with self._lock:
                self.written[block] = data  # acknowledged: its latest version
                self.acked += 1
            time.sleep(0.0002)  # a guest, not a benchmark: leave the resync some CPU

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` more writes were acknowledged."""
        with self._lock:
            target = self.acked + count
        deadline = time.monotonic() + timeout
        while self.acked < target and not self.errors:
            assert time.monotonic() < deadline, "the writers stalled"
            time.sleep(0.005)

    def __enter__(self) -> Writers:
        for thread in self._running:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join()

    def image(self) -> bytes:
        image = bytearray(self.base)
        for block, data in self.written.items():
            image[block * BLOCK : (block + 1) * BLOCK] = data
        return bytes(image)
