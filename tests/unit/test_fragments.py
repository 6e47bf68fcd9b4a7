from __future__ import annotations

import io
import tarfile

import pytest

from sandboxd.build_state import BuildState, copy_archive
from sandboxd.errors import BuildFailed, InvalidArgument
from sandboxd.fragments import expand, parse_fragment


def test_continuations_heredocs_and_case_are_read_as_docker_reads_them() -> None:
    ins = parse_fragment("run echo a \\\n  b\nRUN <<EOF\necho hi\nEOF\nenv A=1")
    assert [i.keyword for i in ins] == ["RUN", "RUN", "ENV"]
    assert [i.line for i in ins] == [1, 3, 6]
    assert ins[1].heredocs == (("EOF", "echo hi\n"),)


def test_the_escape_directive_changes_the_continuation() -> None:
    with pytest.raises(InvalidArgument, match=r"fragment line 2: FROM"):
        parse_fragment("# escape=`\nF`\nROM x")


def test_an_empty_fragment_has_no_instructions() -> None:
    assert parse_fragment("# only a comment\n\n") == ()


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ('"a b"', "a b"),
        ("$A/${A}", "1/1"),
        ("${NOPE:-dflt}${A:+alt}", "dfltalt"),
        ("'$A'", "$A"),
        ("\\$A", "$A"),
    ],
)
def test_words_expand_like_dockers(word: str, expected: str) -> None:
    assert expand(word, {"A": "1"}) == expected


def test_metadata_instructions_change_the_commit_config() -> None:
    state = BuildState.of_image({"Env": ["PATH=/bin"], "Cmd": ["bash"], "Labels": {"a": "1"}})
    for ins in parse_fragment(
        'ARG V=2\nENV X="$V y" PATH=/opt:$PATH\nWORKDIR app\nWORKDIR sub\nUSER 7\n'
        'ENTRYPOINT ["tini"]\nEXPOSE 80\nLABEL b=2'
    ):
        state.apply(ins)
    config = state.commit_config({"c": "3"})
    assert config["Env"] == ["PATH=/opt:/bin", "X=2 y"]
    assert (config["WorkingDir"], config["User"]) == ("/app/sub", "7")
    assert config["Entrypoint"] == ["tini"]
    assert config["Cmd"] is None  # an ENTRYPOINT drops the base's CMD
    assert config["ExposedPorts"] == {"80/tcp": {}}
    assert config["Labels"] == {"a": "1", "b": "2", "c": "3"}


def test_run_forms() -> None:
    state = BuildState()
    shell, exec_form, heredoc, piped = parse_fragment(
        'RUN echo $HOME\nRUN ["echo", "x"]\nRUN <<EOF\necho hi\nEOF\nRUN cat <<EOF > /f\nhi\nEOF'
    )
    assert state.run_argv(shell) == ["/bin/sh", "-c", "echo $HOME"]
    assert state.run_argv(exec_form) == ["echo", "x"]
    assert state.run_argv(heredoc) == ["/bin/sh", "-c", "echo hi\n"]
    assert state.run_argv(piped) == ["/bin/sh", "-c", "cat <<EOF > /f\nhi\nEOF\n"]


def _members(archive: bytes) -> dict[str, tuple[int, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: (m.uid, m.gid, m.mode) for m in tar.getmembers()}


def test_copy_places_files_like_docker() -> None:
    files = {"a.txt": (b"a", 0o600), "dir/b.txt": (b"b", 0o644), "dir/c/d": (b"d", 0o755)}
    state = BuildState(workdir="/w")
    copy_file, copy_dir, copy_all = parse_fragment(
        "COPY --chown=5:6 a.txt x\nCOPY dir /d/\nCOPY --chmod=700 . /all/"
    )
    assert _members(copy_archive(copy_file, state, files, False)) == {"w/x": (5, 6, 0o600)}
    assert set(_members(copy_archive(copy_dir, state, files, True))) == {"d/b.txt", "d/c/d"}
    everything = _members(copy_archive(copy_all, state, files, True))
    assert everything["all/dir/c/d"] == (0, 0, 0o700)


def test_copy_refuses_what_it_cannot_do() -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        t.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    files = {"a": (b"a", 0), "t.tar": (tar.getvalue(), 0)}
    missing, by_name, archive = parse_fragment(
        "COPY nope /x\nCOPY --chown=alice a /x\nADD t.tar /x/"
    )
    for ins, why in ((missing, "no context file"), (by_name, "numeric"), (archive, "unpack")):
        with pytest.raises(BuildFailed, match=why):
            copy_archive(ins, BuildState(), files, True)
