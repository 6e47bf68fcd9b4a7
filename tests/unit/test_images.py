from __future__ import annotations

import threading

import pytest
from fake_engine import BASE, FakeBuilder, FakeEngine

from sandboxd.api import ContextFile
from sandboxd.engine.base import LABEL_KEY, LABEL_MANAGED
from sandboxd.errors import BuildFailed, FailedPrecondition, InvalidArgument, NotFound
from sandboxd.images import (
    LABEL_BUILDER,
    MAX_FRAGMENT,
    BuildOutcome,
    ImageStore,
    check_build_input,
    image_key,
)

FRAGMENT = "RUN echo hi > /hi"


def build(
    store: ImageStore, fragment: str = FRAGMENT, **kw: object
) -> tuple[list[str], BuildOutcome]:
    lines: list[str] = []
    outcome = None
    for item in store.build(kw.pop("base", ""), fragment, kw.pop("context", []), **kw):  # type: ignore[arg-type]
        if isinstance(item, BuildOutcome):
            outcome = item
        else:
            lines.append(item)
    assert outcome is not None
    return lines, outcome


def test_key_is_stable_and_content_addressed() -> None:
    ctx = [ContextFile("a.txt", b"x")]
    key = image_key("sha256:base", FRAGMENT, ctx)
    assert len(key) == 64
    assert image_key("sha256:base", FRAGMENT, list(ctx)) == key
    assert image_key("sha256:base", FRAGMENT + "  \n\n", ctx) == key
    assert image_key("sha256:other", FRAGMENT, ctx) != key
    assert image_key("sha256:base", "RUN echo bye", ctx) != key
    assert image_key("sha256:base", FRAGMENT, [ContextFile("a.txt", b"y")]) != key
    assert image_key("sha256:base", FRAGMENT, [ContextFile("a.txt", b"x", 0o755)]) != key


def test_key_ignores_context_order() -> None:
    a, b = ContextFile("a", b"1"), ContextFile("b", b"2")
    assert image_key("base", "", [a, b]) == image_key("base", "", [b, a])


def test_first_build_calls_the_engine_with_from_base(store: ImageStore, engine: FakeEngine) -> None:
    lines, outcome = build(store, context=[ContextFile("data/f.txt", b"abc", 0o600)])
    assert not outcome.cache_hit
    assert lines == ["Step 1/2 : FROM base", "Successfully built"]
    assert len(engine.builds) == 1
    dockerfile, context, tag = engine.builds[0]
    assert dockerfile == f"FROM {BASE}\n{FRAGMENT}\n"
    assert context == {"data/f.txt": (b"abc", 0o600)}
    assert tag == f"sandbox/img:{outcome.image.key[:32]}"
    labels = engine.images[outcome.image.digest].labels
    assert labels[LABEL_KEY] == outcome.image.key
    assert labels[LABEL_MANAGED] == "1"


def test_second_build_of_same_key_is_a_cache_hit_without_engine_build(
    store: ImageStore, engine: FakeEngine
) -> None:
    _, first = build(store)
    lines, second = build(store, fragment=FRAGMENT + "\n\n")
    assert second.cache_hit
    assert lines == []
    assert second.image.digest == first.image.digest
    assert len(engine.builds) == 1


def test_an_image_records_the_instance_that_built_it(engine: FakeEngine) -> None:
    _, first = build(ImageStore(engine, BASE, "builder1", builder=FakeBuilder(engine)))
    assert engine.images[first.image.digest].labels[LABEL_BUILDER] == "builder1"
    # A cache hit from another instance does not relabel it: it did not build it.
    _, again = build(ImageStore(engine, BASE, "builder2", builder=FakeBuilder(engine)))
    assert again.cache_hit
    assert engine.images[first.image.digest].labels[LABEL_BUILDER] == "builder1"


def test_cache_survives_a_restart_through_engine_labels(engine: FakeEngine) -> None:
    _, first = build(ImageStore(engine, BASE, builder=FakeBuilder(engine)))
    _, again = build(ImageStore(engine, BASE, builder=FakeBuilder(engine)))
    assert again.cache_hit
    assert again.image.key == first.image.key
    assert len(engine.builds) == 1


def test_an_image_removed_behind_our_back_is_rebuilt(store: ImageStore, engine: FakeEngine) -> None:
    _, first = build(store)
    engine.remove_image(first.image.tag)
    _, second = build(store)
    assert not second.cache_hit
    assert len(engine.builds) == 2


def test_concurrent_builds_of_one_key_build_once(store: ImageStore, engine: FakeEngine) -> None:
    results: list[bool] = []

    def worker() -> None:
        results.append(build(store)[1].cache_hit)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(engine.builds) == 1
    assert sorted(results) == [False] + [True] * 7


def test_build_failure_propagates_with_message(store: ImageStore, engine: FakeEngine) -> None:
    engine.build_error = "The command '/bin/sh -c nope' returned a non-zero code: 127"
    with pytest.raises(BuildFailed, match=r"returned a non-zero code: 127"):
        build(store, fragment="RUN nope")
    engine.build_error = None
    _, outcome = build(store, fragment="RUN nope")
    assert not outcome.cache_hit


def test_unknown_base_is_keyed_by_reference(store: ImageStore) -> None:
    ref, identity = store.resolve_base("python:3.12-slim")
    assert (ref, identity) == ("python:3.12-slim", "ref:python:3.12-slim")
    assert store.resolve_base("")[0] == BASE


@pytest.mark.parametrize(
    ("fragment", "context", "why"),
    [
        ("FROM debian\nRUN true", [], "FROM is not allowed"),
        ("RUN true\n  from x", [], "FROM is not allowed"),
        ("RUN true\x00", [], "NUL byte"),
        ("#" * (MAX_FRAGMENT + 1), [], "above the limit"),
        ("", [ContextFile("Dockerfile", b"")], "reserved for the fragment"),
        ("", [ContextFile("../x", b"")], "climbs out"),
        ("", [ContextFile("/abs", b"")], "must be relative"),
        ("", [ContextFile("a", b""), ContextFile("./a", b"")], "given twice"),
        ("", [ContextFile("a", b"", 0o17777)], "not a permission mode"),
    ],
)
def test_bad_build_input_is_refused(fragment: str, context: list[ContextFile], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        check_build_input(fragment, context)


def test_get_list_delete(store: ImageStore, engine: FakeEngine) -> None:
    _, outcome = build(store)
    key = outcome.image.key
    assert store.get(key).digest == outcome.image.digest
    assert [r.key for r in store.list()] == [key]
    store.delete(key)
    assert outcome.image.digest not in engine.images
    with pytest.raises(NotFound, match=r"no image with key"):
        store.get(key)
    with pytest.raises(NotFound):
        store.delete(key)


def test_delete_releases_again_while_a_settling_container_holds_the_image(
    store: ImageStore, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, outcome = build(store)
    real = engine.remove_image
    refusals = [FailedPrecondition("image is being used by running container")] * 2

    def remove(ref: str) -> None:
        if refusals:
            raise refusals.pop()
        real(ref)

    monkeypatch.setattr(engine, "remove_image", remove)
    released: list[str] = []
    store.delete(outcome.image.key, release=released.append)
    assert released == [outcome.image.digest] * 3
    assert outcome.image.digest not in engine.images


def test_delete_gives_up_on_an_image_that_stays_in_use(
    store: ImageStore, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, outcome = build(store)

    def remove(ref: str) -> None:
        raise FailedPrecondition("image is being used by running container")

    monkeypatch.setattr(engine, "remove_image", remove)
    monkeypatch.setattr("sandboxd.images.time.sleep", lambda _: None)
    with pytest.raises(FailedPrecondition, match="being used"):
        store.delete(outcome.image.key)


def test_get_refuses_a_malformed_key(store: ImageStore) -> None:
    with pytest.raises(InvalidArgument, match=r"neither an image key .* nor a tag"):
        store.get("abc\x00")
    with pytest.raises(NotFound, match=r"no image built by sandboxd has the tag 'abc'"):
        store.get("abc")


def test_resolve_ref_takes_keys_tags_and_the_base(store: ImageStore, engine: FakeEngine) -> None:
    _, outcome = build(store)
    assert store.resolve_ref(outcome.image.key) == (outcome.image.tag, outcome.image.digest)
    assert store.resolve_ref(BASE)[0] == BASE
    assert store.resolve_ref("")[0] == BASE


def test_resolve_ref_missing_base_hints_at_bootstrap(engine: FakeEngine) -> None:
    store = ImageStore(engine, "sandbox-base:missing")
    with pytest.raises(NotFound, match=r"sandboxd bootstrap-image"):
        store.resolve_ref("")
    with pytest.raises(NotFound, match=r"build it first"):
        store.resolve_ref("nope:latest")


def test_unknown_instructions_are_refused_with_their_line(store: ImageStore) -> None:
    with pytest.raises(InvalidArgument, match=r"fragment line 2: unknown instruction NOTACOMMAND"):
        build(store, fragment="RUN true\nNOTACOMMAND foo")


def test_step_failures_are_left_as_the_engine_said(store: ImageStore, engine: FakeEngine) -> None:
    engine.build_error = "returned a non-zero code: 1\nsh: line 1: nope: not found"
    with pytest.raises(BuildFailed) as info:
        build(store, fragment="RUN nope")
    assert info.value.message == "image build failed: " + engine.build_error
