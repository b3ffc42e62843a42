"""A full disk, for real: the home lives on a small tmpfs, filled to the byte with a filler
file at the moment a test wants. Every command must then fail with a clear typed error,
leave no temporary files or half-made state, and work again once space is freed.

Mounting needs root (as on the development machine and in CI); elsewhere these tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from voiceprint.engine import Engine, manifests
from voiceprint.engine.errors import DiskFull, NotInitialised, StorageError, TooShort
from voiceprint.engine.home import CHECKPOINTS, RESERVE, RESERVE_BYTES, Home
from voiceprint.engine.models import ModelRegistry
from voiceprint.service import create_app
from voiceprint.storage import Store

REPO = Path(__file__).resolve().parents[1]
DISK = "64m"  # a home of vctk-4 takes ~12 MB, and a refresh ~6 MB more
CONFIG = "[refresh]\nsteps = 3\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n"

pytestmark = pytest.mark.data


class Disk:
    """A mounted tmpfs and a filler file that takes up all but ``leave`` bytes of it."""

    def __init__(self, path: Path) -> None:
        self.path, self.filler = path, path / "filler"

    def fill(self, leave: int = 0) -> None:
        stat = os.statvfs(self.path)
        remaining = stat.f_bavail * stat.f_frsize - leave
        block = b"\xa5" * (1 << 16)
        with open(self.filler, "ab") as fh:
            try:
                while remaining > 0:
                    remaining -= fh.write(block[: min(len(block), remaining)])
                    fh.flush()
            except OSError:  # full already
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, and mounting one needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory, dev_data: Path) -> Path:
    """A closed home with all of vctk-4 enrolled and an API key of each role, copied onto
    each test's disk (enrolling once per module, not once per test)."""
    home = tmp_path_factory.mktemp("template") / "home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    with Engine.init(home=home) as eng:
        files = manifests.by_speaker(dev_data / "vctk-4" / "manifest.csv")
        results = eng.enroll_many([(s, p, None) for s, paths in files.items() for p in paths])
        assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, TooShort)]
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
    (home.parent / "keys").write_text("\n".join(f"{r} {k}" for r, k in keys.items()))
    return home


def home_on(disk: Disk, template: Path) -> Path:
    home = disk.path / "home"
    shutil.copytree(template, home)
    return home


def keys_of(template: Path) -> dict[str, str]:
    return dict(line.split() for line in (template.parent / "keys").read_text().splitlines())


def assert_disk_full_error(error: BaseException, disk: Disk) -> None:
    assert isinstance(error, StorageError), repr(error)
    assert str(error).startswith("disk full: "), error
    assert str(disk.path) not in str(error)  # no path of the server in what a client may read


def leftovers(home: Path) -> list[str]:
    """Files a failed write must not leave: temporary checkpoints."""
    return sorted(p.name for p in (home / CHECKPOINTS).iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# -- init ----------------------------------------------------------------------------------


@pytest.mark.parametrize("leave", [0, 1 << 20], ids=["full", "no-room-for-the-checkpoint"])
def test_init_on_a_full_disk_fails_cleanly_and_leaves_no_home(disk, leave):
    home = disk.path / "home"
    disk.fill(leave)
    with pytest.raises(StorageError) as failed:
        Engine.init(home=home)
    assert_disk_full_error(failed.value, disk)
    assert not home.exists()  # no half-made home: nothing for `open` to trip over later
    disk.free()
    with Engine.init(home=home) as eng:
        assert eng.active_version().number == 1


def test_init_on_a_full_disk_from_the_command_line_is_one_line(disk):
    disk.fill(1 << 20)
    proc = subprocess.run(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(disk.path / "home"), "init"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("voiceprint: error: disk full: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (disk.path / "home").exists()


def test_init_again_completes_one_that_stopped_before_activating(tmp_path):
    """An init that recorded version 1 but stopped before making it active."""
    home = Home.resolve(tmp_path / "home")
    home.path.mkdir()
    with Store(home.url) as store:
        store.schema.upgrade()
        registry = ModelRegistry(home, store)
        registry.create(registry_encoder(home), name=home.config.encoder.name)
    with pytest.raises(NotInitialised):
        Engine.open(home=home.path)
    with Engine.init(home=home.path) as eng:
        assert [v.number for v in eng.versions()] == [1]  # finished, not started over
        assert eng.active_version().number == 1


def registry_encoder(home: Home):
    from voiceprint.engine.encoders import create_encoder

    return create_encoder(home.config.encoder.name, pretrained=True)


# -- refresh -------------------------------------------------------------------------------


def test_refresh_without_room_for_its_checkpoint_fails_cleanly(disk, template):
    home = home_on(disk, template)
    with Engine.open(home=home) as eng:
        disk.fill(1 << 20)  # room for the job's rows, not for a 5.7 MB checkpoint
        with pytest.raises(StorageError) as failed:
            eng.refresh()
        assert_disk_full_error(failed.value, disk)
        assert "checkpoint" in str(failed.value)
        assert leftovers(home) == []
        assert [v.number for v in eng.versions()] == [1]
        job = eng.jobs(limit=1)[0]
        assert job.status == "failed" and job.result["error"].startswith("disk full")
        assert eng.status()["running_job"] is None
        disk.free()
        assert eng.refresh().status in {"promoted", "rejected"}
        assert leftovers(home) == []


def test_a_refresh_whose_last_update_failed_is_not_left_running(disk, template):
    """The disk fills up completely just before the checkpoint is written: the refresh
    fails, and so does recording that it failed. The job must not read running for ever."""
    home = home_on(disk, template)

    def fill_at_the_end(done: int, total: int, what: str) -> None:
        if what.startswith("re-embedding") and done == total:
            disk.fill(0)

    with Engine.open(home=home) as eng:
        with pytest.raises(StorageError) as failed:
            eng.refresh(on_progress=fill_at_the_end)
        assert_disk_full_error(failed.value, disk)
        assert "checkpoint" in str(failed.value)  # the cause, not the failed bookkeeping after it
        assert leftovers(home) == []
        stuck = eng.jobs(limit=1)[0]
        assert stuck.status == "running"  # nothing could be written
        eng.status()  # answers on a full disk (and leaves the job for later)
        disk.free()
        status = eng.status()
        assert status["running_job"] is None
        assert status["last_job"]["id"] == stuck.id and status["last_job"]["status"] == "failed"
        assert "interrupted" in eng.job(stuck.id).result["error"]
        assert eng.refresh().status in {"promoted", "rejected"}


# -- serving and erasure -------------------------------------------------------------------


def test_the_service_starts_on_a_full_disk_and_identifies(disk, template, by_speaker):
    home = home_on(disk, template)
    keys = keys_of(template)
    probe = by_speaker("vctk-4")["p225"][0]  # enrolled: the template holds all of vctk-4
    new = next(iter(by_speaker("speechocean762-train").values()))[0].read_bytes()
    query = {"X-API-Key": keys["query"], "Content-Type": "audio/flac"}
    # Another process (a stream, a second server) keeps the database open, so SQLite's
    # shared-memory index exists: reading needs nothing more (see the next test).
    with Engine.open(home=home) as other:
        other.speakers()
        disk.fill(0)
        with TestClient(create_app(str(home))) as client:
            identified = client.post("/v1/identify", content=probe.read_bytes(), headers=query)
            assert identified.status_code == 200, identified.text
            assert identified.json()["decision"] == "p225"
            enroll = {"X-API-Key": keys["enroll"], "Content-Type": "audio/flac"}
            refused = client.post("/v1/speakers/newcomer/utterances", content=new, headers=enroll)
            assert refused.status_code == 503, refused.text
            # Alive, answering identify, and honest that it cannot enroll.
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["disk"] == {"ok": False, "error": "disk_full"}
            assert ready.json()["checks"]["database"]["ok"] and ready.json()["checks"]["checkpoint"]["ok"]
            disk.free()
            assert client.get("/readyz").json()["ready"] is True
            stored = client.post("/v1/speakers/newcomer/utterances", content=new, headers=enroll)
            assert stored.status_code == 201, stored.text


def test_a_database_on_a_full_disk_opens_on_the_homes_reserve(disk, template, by_speaker, caplog):
    home = home_on(disk, template)  # closed: SQLite must create its shared-memory index to read
    assert (home / RESERVE).stat().st_size == RESERVE_BYTES  # made by init
    disk.fill(0)
    with Engine.open(home=home) as eng:
        assert eng.identify(by_speaker("vctk-4")["p225"][0]).decision == "p225"
        assert not (home / RESERVE).exists() and "released the home's" in caplog.text
        disk.free()
        assert eng.readiness()["ready"] and (home / RESERVE).stat().st_size == RESERVE_BYTES


def test_opening_a_database_on_a_disk_too_full_to_read_it_says_so(disk, template):
    home = home_on(disk, template)
    (home / RESERVE).unlink()  # no reserve left to give up
    disk.fill(0)
    with pytest.raises(DiskFull) as failed:
        Engine.open(home=home)
    assert_disk_full_error(failed.value, disk)


def test_erasure_on_a_full_disk_fails_cleanly_and_works_once_space_is_freed(disk, template):
    """An erasure overwrites every page it frees (secure_delete) through the write-ahead
    log, so it needs free space about the size of what it erases."""
    home = home_on(disk, template)
    with Engine.open(home=home) as eng:
        before = eng.speaker("p226")
        disk.fill(0)
        with pytest.raises(StorageError) as failed:
            eng.erase_speaker("p226")
        assert_disk_full_error(failed.value, disk)
        assert eng.speaker("p226") == before  # nothing half erased
        disk.free()
        assert eng.erase_speaker("p226")["utterances"] == before.utterances
