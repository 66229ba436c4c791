"""agent/filesource.py: loading, reloading on edit/add/delete, and errors that keep the rest."""

from __future__ import annotations

import os
import queue
import time

import pytest

from cn2mirror.agent.filesource import FileSource, SourceError, list_files
from cn2mirror.agent.runtime import Source
from cn2mirror.agent.snapshot import Snapshot

POLL = 0.05


def md(name: str, port: int = 30030) -> str:
    return f"""apiVersion: mirror.cn2mirror.io/v1alpha1
kind: MirrorDestination
metadata:
  name: {name}
spec:
  externalAnalyzer: true
  analyzerIP: 198.19.1.10
  udpPort: {port}
"""


def names(snapshot: Snapshot) -> dict[str, int]:
    return {d["metadata"]["name"]: d["spec"]["udpPort"] for d in snapshot.destinations}


class Recorder:
    def __init__(self):
        self.q: queue.Queue[Snapshot] = queue.Queue()

    def __call__(self, snapshot: Snapshot) -> None:
        self.q.put(snapshot)

    def next(self, timeout: float = 3.0) -> Snapshot:
        return self.q.get(timeout=timeout)

    def quiet(self, seconds: float = 0.4) -> bool:
        try:
            self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def watched(tmp_path):
    sources = []

    def start(*paths, **kwargs):
        src = FileSource(paths or [tmp_path], poll_interval=POLL, settle=0.02, **kwargs)
        rec = Recorder()
        src.start(rec)
        sources.append(src)
        return src, rec

    yield start
    for s in sources:
        s.stop()


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_is_a_source(tmp_path):
    assert isinstance(FileSource([tmp_path]), Source)


def test_initial_load_is_delivered_before_start_returns(tmp_path, watched):
    write(tmp_path / "a.yaml", md("a"))
    write(tmp_path / "sub" / "b.yml", md("b") + "---\n" + md("c"))
    write(tmp_path / "notes.txt", "not yaml: [")  # not a YAML suffix: ignored
    src, rec = watched()
    assert rec.q.qsize() == 1
    assert names(rec.next()) == {"a": 30030, "b": 30030, "c": 30030}
    assert src.ready() and src.errors == ()
    assert rec.quiet()  # nothing changed: no further calls


def test_reload_on_edit_add_delete(tmp_path, watched):
    a = tmp_path / "a.yaml"
    write(a, md("a"))
    src, rec = watched()
    assert names(rec.next()) == {"a": 30030}

    write(a, md("a", 40000))  # edit (same size as before)
    assert names(rec.next()) == {"a": 40000}

    write(tmp_path / "deeper" / "b.yaml", md("b"))  # a new file in a new subdirectory
    assert names(rec.next()) == {"a": 40000, "b": 30030}

    os.unlink(a)  # delete
    assert names(rec.next()) == {"b": 30030}

    # An editor's save: write a new file and rename it over the old one (new inode).
    tmp = tmp_path / "deeper" / ".b.yaml.swp"
    write(tmp, md("b", 31000))
    os.rename(tmp, tmp_path / "deeper" / "b.yaml")
    assert names(rec.next()) == {"b": 31000}
    assert rec.quiet()


def test_touch_without_change_is_not_a_change(tmp_path, watched):
    a = tmp_path / "a.yaml"
    write(a, md("a"))
    src, rec = watched()
    rec.next()
    loads = src.loads
    os.utime(a, None)
    deadline = time.monotonic() + 2
    while src.loads == loads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert src.loads > loads  # it did look again...
    assert rec.quiet(0.3)  # ...but the objects are the same


def test_malformed_file_keeps_the_rest(tmp_path, watched):
    write(tmp_path / "good.yaml", md("good"))
    write(tmp_path / "bad.yaml", md("first") + "---\nkind: [unclosed\n---\n" + md("third"))
    src, rec = watched()
    snap = rec.next()
    # The broken document is reported; the file's other documents and the other file load.
    assert names(snap) == {"good": 30030, "first": 30030, "third": 30030}
    (err,) = src.errors
    assert err.path.endswith("bad.yaml") and err.document == 2
    assert "invalid YAML" in err.reason and err.line is not None

    # A document that is no Kubernetes object: reported by file and document.
    write(tmp_path / "bad.yaml", md("first") + "---\n- just\n- a list\n")
    snap = rec.next()
    assert names(snap) == {"good": 30030, "first": 30030}
    (err,) = src.errors
    assert err.document == 2 and "not a mapping" in err.reason


def test_file_broken_mid_edit_keeps_its_last_good_version(tmp_path, watched):
    a = tmp_path / "a.yaml"
    write(a, md("a", 31000))
    write(tmp_path / "b.yaml", md("b"))
    src, rec = watched()
    assert names(rec.next()) == {"a": 31000, "b": 30030}

    write(a, md("a", 32000) + "  oops: [\n")  # saved half-way through an edit
    snap = rec.next()  # the error is news, the objects are not
    assert names(snap) == {"a": 31000, "b": 30030}
    (err,) = src.errors
    assert "last good version stays in use" in err.reason

    write(tmp_path / "b.yaml", md("b", 30500))  # other files still reload meanwhile
    assert names(rec.next()) == {"a": 31000, "b": 30500}

    write(a, md("a", 32000))  # fixed
    assert names(rec.next()) == {"a": 32000, "b": 30500}
    assert src.errors == ()

    os.unlink(a)  # removing a file removes its objects, whatever state it was in
    assert names(rec.next()) == {"b": 30500}


def test_a_missing_source_refuses_the_start(tmp_path):
    """A path that does not exist would apply an empty state (detach every pod): refused,
    naming the path."""
    with pytest.raises(SourceError, match="later.yaml"):
        FileSource([tmp_path / "later.yaml"])


def test_a_vanished_source_keeps_what_it_gave(tmp_path, watched):
    f = tmp_path / "conf" / "a.yaml"
    write(f, md("a"))
    src, rec = watched(tmp_path / "conf")
    assert names(rec.next()) == {"a": 30030}
    os.rename(tmp_path / "conf", tmp_path / "moved")
    snap = rec.next()
    assert names(snap) == {"a": 30030}  # still in use
    (err,) = src.errors
    assert "no such file" in err.reason and "stay in use until it returns" in err.reason
    os.rename(tmp_path / "moved", tmp_path / "conf")
    write(f, md("a", 40000))
    assert names(rec.next()) == {"a": 40000}
    assert src.errors == ()
    # A file removed from a given directory is a deletion.
    f.unlink()
    assert names(rec.next()) == {}


def test_an_edit_the_api_server_would_refuse_keeps_the_last_accepted_version(
        tmp_path, watched):
    f = tmp_path / "a.yaml"
    write(f, md("a") + "---\n" + md("b", 30031))
    src, rec = watched()
    assert names(rec.next()) == {"a": 30030, "b": 30031}
    # udpPort out of range (schema), and an unknown field: both refused, with the API
    # server's words; the other object of the file takes its edit.
    write(f, md("a", 70000) + "---\n" + md("b", 30032).replace("spec:", "spec:\n  podSelectr: {}"))
    time.sleep(0.05)
    write(f, md("a", 70000) + "---\n" + md("b", 30033) + "  podSelectr: {}\n")
    snap = rec.next()
    assert names(snap) == {"a": 30030, "b": 30031}
    a, b = sorted(src.errors, key=lambda e: e.document)
    assert "MirrorDestination a is invalid" in a.reason and "spec.udpPort" in a.reason
    assert "65535" in a.reason and "last accepted version stays in use" in a.reason
    assert "unknown field .spec.podSelectr" in b.reason
    # Fixed: applied, and the problem clears.
    write(f, md("a", 30040) + "---\n" + md("b", 30041))
    assert names(rec.next()) == {"a": 30040, "b": 30041}
    assert src.errors == ()


def test_a_new_object_the_api_server_would_refuse_is_not_applied(tmp_path, watched):
    write(tmp_path / "a.yaml", md("a", 0))
    src, rec = watched()
    assert names(rec.next()) == {}
    (err,) = src.errors
    assert err.rejected == ("MirrorDestination", "", "a")
    assert "last accepted" not in err.reason


def test_files_in_given_order(tmp_path):
    write(tmp_path / "d" / "b.yaml", "")
    write(tmp_path / "d" / "a" / "z.yaml", "")
    write(tmp_path / "d" / "c.yml", "")
    write(tmp_path / "x.conf", "")
    got = list_files([str(tmp_path / "x.conf"), str(tmp_path / "d")])
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel == ["x.conf", "d/b.yaml", "d/c.yml", "d/a/z.yaml"]


def test_stop_ends_polling(tmp_path):
    write(tmp_path / "a.yaml", md("a"))
    rec = Recorder()
    src = FileSource([tmp_path], poll_interval=POLL)
    src.start(rec)
    rec.next()
    src.stop()
    src.stop()  # idempotent
    write(tmp_path / "a.yaml", md("a", 40000))
    assert rec.quiet(0.3)


def test_bad_arguments():
    with pytest.raises(ValueError):
        FileSource([])
    with pytest.raises(ValueError):
        FileSource(["x"], poll_interval=0)


def test_show_problems_lists_refused_objects_and_why(tmp_path, state_dir):
    """A file-mode agent (real FileSource and compiler, a stand-in node that applies
    nothing) refuses an invalid edit; `cn2mirror show problems` says which object, why,
    and that its last accepted version stays in use."""
    import json

    from click.testing import CliRunner

    from cn2mirror.agent.runtime import Agent
    from cn2mirror.cli.main import main
    from tests.test_runtime import FakeNode

    f = tmp_path / "objects" / "a.yaml"
    write(f, md("a"))
    agent = Agent(FileSource([f.parent], poll_interval=POLL, settle=0.02), "node1",
                  FakeNode(), state_dir)
    agent.start()
    try:
        assert agent.wait_for(1, 5)
        write(f, md("a", 70000))
        deadline = time.monotonic() + 5
        while not agent.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        r = CliRunner().invoke(main, ["show", "problems", "--state-dir", state_dir,
                                      "-o", "json"])
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        (p,) = data["problems"]
        assert p["origin"] == "source" and p["kind"] == "File"
        assert "MirrorDestination a is invalid" in p["reason"]
        assert "last accepted version stays in use" in p["reason"]
        table = CliRunner().invoke(main, ["show", "problems", "--state-dir", state_dir])
        assert "1 problems" in table.stdout and "spec.udpPort" in table.stdout
    finally:
        agent.stop()
    missing = CliRunner().invoke(main, ["show", "problems", "--state-dir",
                                        str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
