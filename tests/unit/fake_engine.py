"""A small in-memory container engine satisfying sandboxd.engine.base.Engine."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import IO

from sandboxd.build_run import BuildJob
from sandboxd.builder import EngineBuilder
from sandboxd.engine.base import CgroupSample, ContainerInfo, ContainerSpec, ImageFacts
from sandboxd.errors import BuildFailed, EngineUnavailable, NotFound


@dataclass
class FakeImage:
    id: str
    tags: list[str]
    labels: dict[str, str]
    size: int = 4096


@dataclass
class FakeContainer:
    spec: ContainerSpec
    running: bool = True
    created_unix: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)


class FakeEngine:
    """Records what the core asked of the engine; images and containers live in dicts."""

    def __init__(self) -> None:
        self.images: dict[str, FakeImage] = {}
        self.containers: dict[str, FakeContainer] = {}
        self.builds: list[tuple[str, dict[str, tuple[bytes, int]], str]] = []
        self.removed: list[str] = []
        self.failed_removals = 0
        self.down = False
        self.build_error: str | None = None
        self.now = 1_000_000.0
        self._n = 0

    def add_image(self, tag: str, labels: Mapping[str, str] | None = None) -> str:
        image_id = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
        self.images[image_id] = FakeImage(image_id, [tag], dict(labels or {}))
        return image_id

    def add_container(self, labels: Mapping[str, str], created_unix: float = 0.0) -> str:
        """A container some other instance made."""
        self._n += 1
        cid = f"c{self._n:04d}"
        spec = ContainerSpec(image="x", name=f"other-{self._n}", labels=dict(labels))
        self.containers[cid] = FakeContainer(spec, True, created_unix, dict(labels))
        return cid

    def _check(self) -> None:
        if self.down:
            raise EngineUnavailable("cannot reach the fake engine")

    def _find(self, ref: str) -> FakeImage | None:
        for image in self.images.values():
            if ref == image.id or ref in image.tags:
                return image
        return None

    # -- Engine ------------------------------------------------------------

    def ping(self) -> None:
        self._check()

    def image_id(self, ref: str) -> str | None:
        self._check()
        image = self._find(ref)
        return image.id if image else None

    def image_labels(self, ref: str) -> Mapping[str, str]:
        self._check()
        image = self._find(ref)
        if image is None:
            raise NotFound(f"no image {ref}")
        return dict(image.labels)

    def image_facts(self, ref: str) -> ImageFacts | None:
        self._check()
        image = self._find(ref)
        return None if image is None else ImageFacts(image.id, dict(image.labels), image.size)

    def build_image(
        self,
        dockerfile: str,
        context: Mapping[str, tuple[bytes, int]],
        tag: str,
        labels: Mapping[str, str],
    ) -> Iterator[str]:
        self._check()
        self.builds.append((dockerfile, dict(context), tag))
        yield "Step 1/2 : FROM base"
        if self.build_error is not None:
            raise BuildFailed(f"image build failed: {self.build_error}")
        yield "Successfully built"
        content = dockerfile + repr(sorted(context.items())) + repr(sorted(labels.items()))
        image_id = "sha256:" + hashlib.sha256(content.encode()).hexdigest()
        self.images[image_id] = FakeImage(image_id, [tag], dict(labels))

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        self._check()
        return self.add_image(tag, labels)

    def remove_image(self, ref: str) -> None:
        self._check()
        image = self._find(ref)
        if image is not None:
            del self.images[image.id]

    def list_images(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        self._check()
        return [
            (i.id, list(i.tags), i.labels, 1000) for i in self.images.values() if label in i.labels
        ]

    def runtimes(self) -> set[str]:
        self._check()
        return {"runc"}

    def version(self) -> str:
        self._check()
        return "0-fake"

    def create_container(self, spec: ContainerSpec) -> str:
        self._check()
        self._n += 1
        cid = f"c{self._n:04d}"
        self.containers[cid] = FakeContainer(spec, True, time.time(), dict(spec.labels))
        return cid

    def remove_container(self, container_id: str) -> None:
        if self.down:
            self.failed_removals += 1
        self._check()
        self.removed.append(container_id)
        self.containers.pop(container_id, None)

    def rename_container(self, container_id: str, name: str) -> None:
        self._check()
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        c = self.containers[container_id]
        c.spec = replace(c.spec, name=name)

    def kill_container(self, container_id: str) -> None:
        if container_id in self.containers:
            self.containers[container_id].running = False

    def container_running(self, container_id: str) -> bool:
        c = self.containers.get(container_id)
        return c is not None and c.running

    def list_containers(self, label: str) -> list[ContainerInfo]:
        self._check()
        return [
            ContainerInfo(cid, c.spec.name, dict(c.labels), "running", c.created_unix)
            for cid, c in list(self.containers.items())
            if label in c.labels
        ]

    def exec(
        self,
        container_id: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        workdir: str,
        user: str,
        stdin: bool,
        tty: bool = False,
        window: tuple[int, int] | None = None,
    ) -> FakeExec:
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        return FakeExec()

    def sample(self, container_id: str) -> CgroupSample:
        return CgroupSample(cpu_ns=0, memory_peak_bytes=0, oom_kills=0, pids_max_events=0)

    def reset_peak(self, container_id: str) -> None:
        pass


class FakeExec:
    """A command that prints nothing and exits 0."""

    def write_stdin(self, data: bytes) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def output(self) -> Iterator[tuple[int, bytes]]:
        return iter(())

    def exit_code(self) -> int | None:
        return 0

    def start_failure(self) -> str | None:
        return None

    def resize(self, rows: int, columns: int) -> None:
        pass

    def signal(self, signum: int) -> None:
        pass

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass


BASE = "sandbox-base:bookworm"


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Removal runs in the background: poll for its effect."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class FakeBuilder(EngineBuilder):
    """The fake engine's build (it is no LayerEngine), keeping the jobs it was given."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.jobs: list[BuildJob] = []

    def build(self, job: BuildJob, cancel: threading.Event | None = None) -> Iterator[str]:
        self.jobs.append(job)
        yield from super().build(job, cancel)
